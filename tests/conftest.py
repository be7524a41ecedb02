"""Shared fixtures: tiny random dense models of every supported architecture, built with
transformers itself so the converter is tested against the library users load checkpoints with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Modules holding a slow test run first. `make test` hands whole modules to its pytest-xdist
    workers in collection order (``-n 2 --dist loadfile --no-loadscope-reorder``: a module-scoped
    fixture is built once, on one worker), so no long module starts last and leaves the other
    worker idle (longest first: Graham's LPT rule for parallel machines)."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow_first = sorted(modules, key=lambda m: not any(i.get_closest_marker("slow") for i in modules[m]))
    items[:] = [i for m in slow_first for i in modules[m]]


# name -> (config class name, kwargs)
DENSE_ARCHS = {
    # GQA, untied, linear RoPE scaling
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-tied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    # sliding window shorter than the test sequence
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
    # q/k/v biases, tied embeddings
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # q/k norm, head_dim that is not hidden / heads
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    # Granite's four scalars away from 1, biases on all four attention projections
    "granite": ("GraniteConfig", dict(num_key_value_heads=2, embedding_multiplier=3.0, residual_multiplier=0.4,
                                      attention_multiplier=0.3, logits_scaling=2.5, attention_bias=True)),
}


def build_dense(path: Path, arch: str, seed: int = 0, hidden: int = 32, d_f: int = 64,
                layers: int = 2, vocab: int = 96, dtype: torch.dtype = torch.float32, **extra) -> Path:
    """A tiny dense model saved with ``save_pretrained``; every parameter (norms and biases too)
    is randomised so that a tensor copied to the wrong place cannot go unnoticed."""
    import transformers
    from transformers.utils import logging

    logging.disable_progress_bar()
    cls_name, kwargs = DENSE_ARCHS[arch]
    kwargs = dict(kwargs, **extra)
    cfg = getattr(transformers, cls_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=d_f, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=256, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {arch: build_dense(root / arch, arch) for arch in DENSE_ARCHS}


@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory) -> Path:
    """A llama with enough neurons for statistical checks of re-initialised values."""
    return build_dense(tmp_path_factory.mktemp("wide") / "llama", "llama", hidden=64, d_f=320,
                       layers=2)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def expert_weight(tensors: dict[str, torch.Tensor], target: str, layer: int, expert: int, matrix: str) -> torch.Tensor:
    """One expert's matrix from a checkpoint's tensors, one tensor per expert or stacked (GraniteMoE)."""
    from dropup.hub import names as archs

    stacked = archs.stacked_in(target, layer, matrix)
    if stacked is not None:
        return archs.expert_matrix(tensors[stacked[0]], stacked[1], matrix)[expert]
    return tensors[archs.expert_name(target, layer, expert, matrix)]


def cli_fails(capsys, argv, *needles) -> str:
    """Run the CLI on ``argv``: it must exit 2 with exactly one line on stderr, no traceback,
    containing every needle. Returns that line."""
    from dropup.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def upcycle_refused(capsys, src, work, args, *needles) -> None:
    """``dropup upcycle SRC WORK/out ARGS`` is refused as ``cli_fails`` requires, and the empty
    directory ``work`` stays empty: nothing written, not even a hidden temporary."""
    cli_fails(capsys, ["upcycle", str(src), str(work / "out"), "--quiet", *args], *needles)
    assert list(work.iterdir()) == []


def run_timed(cmd: list[str], **kwargs):
    """``subprocess.run(cmd, **kwargs)`` and the CPU seconds it took. Tests bound CPU time, not wall
    time: on a shared machine, or beside the other xdist worker, wall time measures the other jobs
    as well."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
