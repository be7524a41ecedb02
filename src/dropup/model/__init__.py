"""The decoder (dense or MoE), its language-model loss, and loading / saving it as a Hugging Face checkpoint."""
