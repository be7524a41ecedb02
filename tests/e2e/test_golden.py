"""Outputs locked against checked-in values, so no refactor can change them unnoticed.

``golden.json`` holds (1) fixed dense sources: config.json and tensor shapes, written here with
safetensors' own writer from a seeded generator, so they depend on neither transformers nor
dropup; (2) the SHA-256 of every file ``dropup upcycle`` writes for each case below; (3) the
per-step metrics of two fixed tiny CPU training runs.

Normalised before hashing, because they record the machine rather than the conversion:
``transformers_version`` in config.json, and ``seconds``, source paths (also btx's ``options.sources``) and ``dropup_version`` in
upcycling.json (that file is hashed as re-serialised JSON).

Training metrics come from fp32 CPU matmuls whose summation order may differ on another CPU, so
each value may differ from the recorded one by at most ``ULPS`` units in the last place of
float32 (relative 8 * 2^-23 ~ 9.5e-7); on the machine that recorded them they are identical.

After an intended change of outputs, regenerate with
``.venv/bin/python tests/e2e/test_golden.py --write`` and say why in the commit message.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).with_name("golden.json")
ULPS = 8
SIDE_FILES = {"tokenizer_config.json": '{"model_max_length": 256}\n',
              "generation_config.json": '{"bos_token_id": 1, "eos_token_id": 2}\n'}

# case -> (source, upcycle options)
UPCYCLE_CASES = {
    "drop": ("llama", dict(method="drop", ratio=0.5)),
    "drop-per-matrix-matrix-stats": ("llama", dict(method="drop", ratio=0.25, index_sampling="per-matrix",
                                                   reinit_stats="matrix", router_init="normal")),
    "drop-r1-bf16-sharded": ("llama", dict(method="drop", ratio=1.0, dtype="bfloat16",
                                           max_shard_size="20KB", num_experts=4, top_k=1)),
    "naive": ("llama", dict(method="naive")),
    "noise": ("llama", dict(method="noise", ratio=0.5, noise_std=0.05)),
    "scratch": ("llama", dict(method="scratch", router_init="zeros")),
    "btx": ("llama", dict(method="btx", sources=["llama-b", "llama-c", "llama-d"])),
    "llama-qwen3_moe": ("llama-legacy", dict(method="drop", target="qwen3_moe")),
    "mistral-mixtral": ("mistral", dict(method="drop", seed=3)),
    "qwen2-qwen2_moe": ("qwen2", dict(method="drop")),
    "qwen2-qwen2_moe-scratch": ("qwen2", dict(method="scratch")),
    "qwen3-qwen3_moe": ("qwen3", dict(method="noise", ratio=0.5)),
    "qwen3-qwen3_moe-layer-1-only": ("qwen3", dict(method="drop", moe_layers="1")),
    "granite-granitemoe": ("granite", dict(method="drop", ratio=0.5)),
}
SOURCES_OF_CASES = {"llama-b": "llama", "llama-c": "llama", "llama-d": "llama"}


def write_source(root: Path, name: str, spec: dict, seed: int) -> Path:
    from safetensors.torch import save_file

    path = root / name
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for t, shape in sorted(spec["tensors"].items()):
        if t.endswith("norm.weight"):
            tensors[t] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            tensors[t] = 0.1 * torch.randn(shape, generator=gen)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(spec["config"], indent=2) + "\n")
    for fname, text in SIDE_FILES.items():
        (path / fname).write_text(text)
    return path


def _sources(root: Path, golden: dict) -> dict[str, Path]:
    specs = golden["sources"]
    out = {name: write_source(root, name, spec, seed=i) for i, (name, spec) in enumerate(specs.items())}
    for i, (name, base) in enumerate(SOURCES_OF_CASES.items()):
        out[name] = write_source(root, name, specs[base], seed=100 + i)
    return out


def _normalised_sha(path: Path) -> str:
    data = path.read_bytes()
    if path.name == "config.json":
        cfg = json.loads(data)
        cfg["transformers_version"] = "X"
        data = json.dumps(cfg, indent=2).encode()
    elif path.name == "upcycling.json":
        prov = json.loads(data)
        prov["seconds"] = 0
        prov["dropup_version"] = "X"
        prov["source"]["path"] = "SRC"
        for s in prov["btx_sources"]:
            s["path"] = "SRC_N"
        prov["options"]["sources"] = ["SRC_N"] * len(prov["options"]["sources"])
        data = json.dumps(prov, indent=1).encode()
    return hashlib.sha256(data).hexdigest()


def upcycle_checksums(root: Path, golden: dict) -> dict[str, dict[str, str]]:
    from dropup import upcycle

    src = _sources(root / "src", golden)
    out = {}
    for case, (source, opts) in UPCYCLE_CASES.items():
        opts = dict(opts, progress=False, threads=2)
        if "sources" in opts:
            opts["sources"] = [str(src[s]) for s in opts["sources"]]
        dst = root / "out" / case
        upcycle(src[source], dst, **opts)
        out[case] = {f.name: _normalised_sha(f) for f in sorted(dst.iterdir())}
    return out


def _docs(n: int, seed: int) -> list[list[int]]:
    r = np.random.default_rng(seed)
    return [[int(1 + (r.integers(1, 60) + r.integers(1, 4) * i) % 60) for i in range(r.integers(20, 80))] + [0]
            for _ in range(n)]


METRIC_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens")


def train_metrics(root: Path, golden: dict) -> dict[str, list[dict]]:
    from dropup import upcycle
    from dropup.data.tokens import write_dataset
    from dropup.train.loop import train
    from dropup.train.config import load_config

    data = [write_dataset(root / name, {"train": _docs(120, s), "val": _docs(12, s + 1)}, 64, eos_token_id=0)
            for name, s in (("prose", 1), ("code", 3))]
    src = _sources(root / "src", {"sources": {"llama": golden["sources"]["llama"]}})
    init = root / "moe-init"
    upcycle(src["llama"], init, method="drop", num_experts=4, progress=False)
    runs = {
        "preset-moe-tiny": {"model": {"preset": "moe-tiny"}},
        "upcycled-per-layer-z": {"model": {"init": str(init)},
                                 "loss": {"balance_mode": "per-layer", "z_loss_coef": 1e-3}},
    }
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, over in runs.items():
            cfg = {"data": {"datasets": [{"path": str(data[0]), "weight": 2}, {"path": str(data[1])}],
                            "seq_len": 16, "eval_batches": 2},
                   "batch": {"global_batch": 4, "micro_batch": 2}, "steps": 6,
                   "optim": {"lr": 3e-3, "warmup_steps": 2}, "log_interval": 1, "eval_interval": 3,
                   "save_interval": 3, "progress": False, "device": "cpu", "precision": "fp32",
                   "compile": False, "out_dir": str(root / "runs" / name), **over}
            run = train(load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()]))
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            out[name] = [{k: r[k] for k in (*METRIC_KEYS, "val_loss") if k in r} for r in records]
    finally:
        torch.set_num_threads(threads)
    return out


def _close(a: float, b: float) -> bool:
    if a == b:
        return True
    ulp = float(np.spacing(np.float32(max(abs(a), abs(b)))))  # float32 ulp of the larger magnitude
    return abs(a - b) <= ULPS * ulp


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_upcycle_writes_the_recorded_bytes(tmp_path, golden):
    got = upcycle_checksums(tmp_path, golden)
    for case, files in golden["upcycle"].items():
        assert got[case] == files, f"upcycle case {case}: files differ from the recorded checksums"
    assert set(got) == set(golden["upcycle"])


def test_training_losses_are_the_recorded_ones(tmp_path, golden):
    got = train_metrics(tmp_path, golden)
    assert set(got) == set(golden["train"])
    for run, records in golden["train"].items():
        assert len(got[run]) == len(records), run
        for step, (g, want) in enumerate(zip(got[run], records), start=1):
            assert set(g) == set(want), (run, step)
            for k, v in want.items():
                if k == "val_loss":
                    assert set(g[k]) == set(v)
                    for d in v:
                        assert _close(g[k][d], v[d]), (run, step, k, d, g[k][d], v[d])
                else:
                    assert _close(g[k], v), (run, step, k, g[k], v)


def _write(path: Path) -> None:
    import tempfile

    golden = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        golden["upcycle"] = upcycle_checksums(Path(tmp) / "u", golden)
        golden["train"] = train_metrics(Path(tmp) / "t", golden)
    path.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__" and "--write" in sys.argv:
    _write(GOLDEN)
