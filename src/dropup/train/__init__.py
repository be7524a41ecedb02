"""Training: the run config, the loop, run checkpoints, the router losses, the optimizer."""
