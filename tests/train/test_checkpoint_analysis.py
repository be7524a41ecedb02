"""``analysis: {routing: true}``: every saved checkpoint of an MoE run gets the routing analysis
of its export, and analysis/routing.jsonl holds the curve (JSD, dead experts per checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dropup.analysis.specialisation import RoutingOptions, analyze_routing
from dropup.data.prepare import PrepareOptions, prepare
from dropup.train.config import load_config
from dropup.train.loop import train

DOCS = [f"item {i}: the {w} entry holds {i * 7}." for i in range(40) for w in ("left", "right")]


@pytest.mark.slow  # a routing analysis with its figures at each of 3 checkpoints
def test_each_checkpoint_is_analysed_and_the_curve_is_logged(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    data = tmp_path / "notes"
    prepare(PrepareOptions(inputs=[str(src)], out=str(data), vocab_size=300, val_fraction=0.3, progress=False))
    cfg = {"model": {"preset": "moe-tiny"}, "data": {"datasets": [{"path": str(data)}], "seq_len": 16},
           "batch": {"global_batch": 4, "micro_batch": 2}, "steps": 3, "optim": {"lr": 3e-3, "warmup_steps": 1},
           "log_interval": 1, "eval_interval": 0, "save_interval": 1, "keep_last": 1, "progress": False,
           "device": "cpu", "precision": "fp32", "compile": False, "out_dir": str(tmp_path / "run"),
           "analysis": {"routing": True, "tokens": 200}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = train(load_config(tmp_path / "run.yaml"))
    finally:
        torch.set_num_threads(threads)
    curve = [json.loads(line) for line in (run_dir / "analysis" / "routing.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [1, 2, 3]
    assert [c["tokens"] for c in curve] == [64, 128, 192]
    assert all(c["domains"] == ["notes"] and c["tokens_per_domain"] == 200 for c in curve)
    # one domain: nothing to diverge from
    assert all(c["mean_jsd"] == 0.0 for c in curve)
    for step in (1, 2, 3):  # kept although keep_last pruned the checkpoints themselves
        assert (run_dir / "analysis" / f"step_{step}" / "routing" / "routing.json").exists()
    # the last entry is what `dropup analyze routing` says of the final export
    again = analyze_routing(RoutingOptions([str(run_dir / "ckpt" / "step_3" / "model")], [str(data)],
                                           str(tmp_path / "again"), tokens=200, seq_len=16, device="cpu"))
    assert again["models"][0]["dead_count"] == curve[-1]["dead_count"]
    saved = json.loads((run_dir / "analysis" / "step_3" / "routing" / "routing.json").read_text())
    assert saved["models"][0]["counts"] == again["models"][0]["counts"]
    # A resumed run rewrites the curve from its checkpoint on: the line of the step it redoes is
    # replaced, not duplicated.
    (run_dir / "analysis" / "routing.jsonl").write_text(
        "".join(json.dumps(c) + "\n" for c in curve + [{**curve[-1], "step": 4}]))  # a later step's leftover
    torch.set_num_threads(1)
    try:
        cfg2 = load_config(tmp_path / "run.yaml", overrides=["steps=4", "allow_resume_changes=true"])
        train(cfg2, resume=True)
    finally:
        torch.set_num_threads(threads)
    curve2 = [json.loads(line) for line in (run_dir / "analysis" / "routing.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve2] == [1, 2, 3, 4]
    assert curve2[:3] == curve and curve2[3]["tokens"] == 256
