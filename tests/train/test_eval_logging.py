"""Training's validation logs bits per byte per dataset, equal to what `dropup eval` gives on the
exported checkpoint for the same windows; ``log.tensorboard`` writes metrics.jsonl's scalars as
TensorBoard events (read back with tensorboard's EventAccumulator)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from dropup.analysis.evaluate import EvalOptions, evaluate
from dropup.data.prepare import PrepareOptions, prepare
from dropup.errors import UserError
from dropup.train.config import load_config
from dropup.train.loop import train

DOCS = [f"line {i}: the {w} value is {i * 3}." for i in range(40) for w in ("first", "second")]
HAS_TB = importlib.util.find_spec("tensorboard") is not None


def _config(root: Path, data: Path, **over) -> dict:
    return {"model": {"preset": "moe-tiny"},
            "data": {"datasets": [{"path": str(data)}], "seq_len": 16, "eval_batches": 1},
            "batch": {"global_batch": 4, "micro_batch": 2}, "steps": 2,
            "optim": {"lr": 3e-3, "warmup_steps": 1}, "log_interval": 1, "eval_interval": 1,
            "save_interval": 2, "progress": False, "device": "cpu", "precision": "fp32",
            "compile": False, "out_dir": str(root / "run"), **over}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bpb")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    data = root / "prose"
    prepare(PrepareOptions(inputs=[str(src)], out=str(data), vocab_size=300, val_fraction=0.3, progress=False))
    cfg = _config(root, data, log={"tensorboard": HAS_TB})
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(root / "run.yaml")), data
    finally:
        torch.set_num_threads(threads)


def test_training_logs_the_bits_per_byte_dropup_eval_gives(run):
    run_dir, data = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert set(r["val_bpb"]) == set(r["val_loss"]) == {"prose"}
        assert math.isfinite(r["val_bpb"]["prose"]) and r["val_bpb"]["prose"] > 0
    # eval_batches 1 x micro_batch 2 windows of 16 + 1 tokens: dropup eval on the first 33 tokens
    report = evaluate(EvalOptions([str(run_dir / "ckpt" / "step_2" / "model")], [str(data)], seq_len=16,
                                  tokens=2 * 16 + 1, device="cpu", progress=False))
    got = report["models"][0]["datasets"]["prose"]
    assert got["bpb"] == pytest.approx(records[-1]["val_bpb"]["prose"], rel=1e-5)
    assert got["loss"] == pytest.approx(records[-1]["val_loss"]["prose"], rel=1e-5)


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (pip install 'dropup[tensorboard]')")
def test_tensorboard_events_hold_the_logged_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lm_loss", "lr", "val_loss/prose", "val_bpb/prose", "router_entropy/0"} <= tags
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert acc.Scalars("val_bpb/prose")[-1].value == pytest.approx(records[-1]["val_bpb"]["prose"], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r"tensorboard package is not installed; pip install 'dropup\[tensorboard\]'"):
        load_config(None, ["model.preset=moe-tiny", f"data.datasets=[{{path: {tmp_path}}}]", "steps=1",
                           "log.tensorboard=true"])
