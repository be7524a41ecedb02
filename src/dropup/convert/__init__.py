"""Building MoE checkpoints from dense ones: the construction methods, weight surgery, the sampler, verification."""
