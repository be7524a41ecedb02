"""Hugging Face format: the names of tensors and config keys per architecture, config.json reading and writing, safetensors files, atomic output directories."""
