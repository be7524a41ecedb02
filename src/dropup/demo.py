"""`make demo`: build a small dense model, upcycle it by every method, and inspect the results.

Training and the built-in corpus arrive in later issues; until then the BTX "branches" are the
dense model with small seeded perturbations standing in for further-trained copies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dropup.inspect import format_report, inspect_checkpoint
from dropup.upcycle import upcycle


def build_dense(out: Path, seed: int, tiny: bool, perturb_from: Path | None = None) -> Path:
    """A small random Llama checkpoint (or a perturbed copy of one) saved with transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging

    logging.disable_progress_bar()

    torch.manual_seed(seed)
    if perturb_from is not None:
        model = AutoModelForCausalLM.from_pretrained(perturb_from, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.002)
    else:
        cfg = LlamaConfig(
            vocab_size=512 if tiny else 4096, hidden_size=64 if tiny else 256,
            intermediate_size=128 if tiny else 1024, num_hidden_layers=2 if tiny else 4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    return out


def run_demo(out: str | Path, tiny: bool = False) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dense = build_dense(out / "dense", seed=0, tiny=tiny)
    branches = [build_dense(out / f"branch{i}", seed=i, tiny=tiny, perturb_from=dense)
                for i in (1, 2, 3)]
    runs = {
        "naive": dict(method="naive"),
        "drop-0.5": dict(method="drop", ratio=0.5),
        "drop-0.5-per-matrix": dict(method="drop", ratio=0.5, index_sampling="per-matrix"),
        "drop-1.0": dict(method="drop", ratio=1.0),
        "noise-0.5": dict(method="noise", ratio=0.5),
        "scratch": dict(method="scratch"),
        "btx": dict(method="btx", sources=[str(b) for b in branches]),
    }
    for name, opts in runs.items():
        prov = upcycle(dense, out / name, overwrite=True, progress=False,
                       verify=opts["method"] == "naive", **opts)
        print(f"== {name}: {prov['output_bytes'] / 1e6:.1f} MB in {prov['seconds']:.2f} s"
              + (f", verify {prov['verify']}" if "verify" in prov else ""))
        print(format_report(inspect_checkpoint(out / name)))
        print()
