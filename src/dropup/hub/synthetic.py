"""Synthetic dense checkpoints of any size, written streaming (for benchmarks and memory tests).

The weights are random (seeded) and the files are a valid Hugging Face Llama checkpoint, so they
exercise the converter exactly as a real model of the same shape would. The paper's shapes are
available by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dropup.hub.config import config_json
from dropup.hub.names import dense_shape
from dropup.hub.safetensors import DTYPE_NAMES, ShardedWriter, TensorSpec, parse_size
from dropup.model.presets import PAPER_SHAPES  # noqa: F401 - re-exported for benchmarks


def llama_config(**overrides) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    }
    cfg.update(overrides)
    return cfg


def write_synthetic_dense(out: str | Path, config: dict, dtype: str = "bfloat16", seed: int = 0,
                          max_shard_size: str = "5GB") -> Path:
    """Write a random dense checkpoint for ``config`` to ``out`` one tensor at a time."""
    return write_random_checkpoint(out, config, dense_shape(config).all_tensors(), dtype, seed, max_shard_size)


def write_random_checkpoint(out: str | Path, config: dict, shapes: dict[str, tuple[int, ...]],
                            dtype: str = "bfloat16", seed: int = 0, max_shard_size: str = "5GB") -> Path:
    """Write ``config`` (its config.json dict) and a random tensor for each of ``shapes`` (Hub name
    -> shape, in the order written) to ``out``, one tensor at a time: norms near 1, every other
    tensor N(0, 0.02^2), all from one generator seeded with ``seed``. Memory stays at one tensor
    whatever the model's size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config, torch_dtype=dtype)
    dt = DTYPE_NAMES[dtype]
    plan = [TensorSpec(dt, tuple(s), name=n) for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(seed)
    with ShardedWriter(out, plan, parse_size(max_shard_size)) as writer:
        for spec in plan:
            if spec.name.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
            else:
                t = torch.empty(spec.shape).normal_(0.0, 0.02, generator=gen)
            writer.write(spec.name, t.to(dt))
    (out / "config.json").write_text(config_json(config))
    return out
