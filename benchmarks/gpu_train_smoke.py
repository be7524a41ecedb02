#!/usr/bin/env python3
"""GPU smoke test of `dropup train` (bf16 autocast, per-layer compile, fused AdamW, chunked CE):
a tiny MoE on toy data must train, checkpoint and resume, with the routing analysis of every
checkpoint and TensorBoard events on; then `dropup eval` of the run's checkpoints on the GPU.
Run on a CUDA machine:

    python benchmarks/gpu_train_smoke.py OUT_DIR [--only-issue16]

The last part (issue 16, and issue 15's expansion) trains an expanded MoE loaded through the
meta device, with selective activation checkpointing and bf16 AdamW moments (the compiled
update); ``--only-issue16`` runs that part alone.
"""

import json
import subprocess
import sys
from pathlib import Path

import os
import shutil

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dropup.convert.upcycle import upcycle  # noqa: E402
from dropup.data.tokens import write_dataset  # noqa: E402
from dropup.pipeline import Scale, dense_init  # noqa: E402

out = Path(sys.argv[1])
ONLY16 = "--only-issue16" in sys.argv[2:]
rng = np.random.default_rng(0)
docs = [[1 + (s + i) % 60 for i in range(int(rng.integers(20, 200)))] + [0] for s in rng.integers(0, 60, 2000)]
write_dataset(out / "toy", {"train": docs, "val": docs[:50]}, vocab_size=64, eos_token_id=0)
cfg = out / "smoke.yaml"
cfg.write_text(json.dumps({
    "model": {"preset": "moe-tiny"}, "data": {"datasets": [{"path": str(out / "toy")}], "seq_len": 256},
    "batch": {"global_batch": 16, "micro_batch": 8}, "steps": 60, "optim": {"lr": 3e-3, "warmup_steps": 5},
    "log_interval": 10, "eval_interval": 30, "save_interval": 30, "out_dir": str(out / "run"),
    "analysis": {"routing": True, "tokens": 4096}, "log": {"tensorboard": True}}))
cmd = [sys.executable, "-m", "dropup", "train", "--config", str(cfg)]
if not ONLY16:
    subprocess.run(cmd, check=True)


def issue15_and_earlier():
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    print(f"GPU train smoke: step {first['step']} loss {first['loss']:.4f} -> step {last['step']} loss "
          f"{last['loss']:.4f}, {last['tokens_per_s']:.0f} tok/s, val {last.get('val_loss')}")
    assert last["loss"] < first["loss"] * 0.7, "loss did not fall"
    subprocess.run(cmd + ["--set", "steps=70", "--resume", "--allow-config-change"], check=True)
    print("resumed to", json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"])
    curve = [json.loads(x) for x in (out / "run" / "analysis" / "routing.jsonl").read_text().splitlines()]
    print("routing per checkpoint:", [(c["step"], round(c["mean_jsd"], 4), c["dead_total"]) for c in curve])
    assert [c["step"] for c in curve] == [30, 60, 70], curve
    assert any((out / "run" / "tensorboard").iterdir()), "no TensorBoard events"
    subprocess.run([sys.executable, "-m", "dropup", "eval", str(out / "run"), "--data", str(out / "toy"),
                    "--device", "cuda", "--seq-len", "256", "--quiet", "--out", str(out / "eval")], check=True)

    # Issue 15 on the GPU: aux-loss-free balancing (the selection bias is updated in place after every
    # step: it must not make the compiled layers recompile) on a fine-grained MoE with dense layers.


    shape = Scale(corpus_mb=0, vocab_size=64, hidden=128, d_f=512, layers=4, heads=4, kv_heads=2, seq_len=256,
                  global_batch=16, micro_batch=8, dense_steps=0, moe_steps=0, dense_lr=0, moe_lr=0,
                  eval_interval=0, eval_batches=1)
    dense_init(out / "dense", shape, vocab=64, seed=0)
    upcycle(out / "dense", out / "granular", method="drop", ratio="linear:0.25:0.75", num_experts=8, top_k=4,
            granularity=2, target="qwen3_moe", moe_layers="every:2", progress=False)
    cfg2 = out / "bias.yaml"
    cfg2.write_text(json.dumps({
        "model": {"init": str(out / "granular")}, "data": {"datasets": [{"path": str(out / "toy")}], "seq_len": 256},
        "batch": {"global_batch": 16, "micro_batch": 8}, "steps": 40, "optim": {"lr": 3e-3, "warmup_steps": 5},
        "loss": {"bias_update_rate": 0.001}, "log_interval": 10, "eval_interval": 20, "save_interval": 20,
        "out_dir": str(out / "bias-run")}))
    r = subprocess.run([sys.executable, "-m", "dropup", "train", "--config", str(cfg2)],
                       env={**os.environ, "TORCH_LOGS": "recompiles"}, capture_output=True, text=True)
    print(r.stdout[-2000:], r.stderr[-4000:])
    assert r.returncode == 0, "granular + mixed-layer + bias training failed"
    recompiles = [x for x in r.stderr.splitlines() if "Recompiling" in x]
    print(f"bias run: {len(recompiles)} recompilations")
    lines = [json.loads(x) for x in (out / "bias-run" / "metrics.jsonl").read_text().splitlines()]
    print("router_max_mean:", [x.get("router_max_mean") for x in lines][:1], "->", lines[-1].get("router_max_mean"),
          "router_bias_max:", lines[-1].get("router_bias_max"), "router_layers:", lines[-1].get("router_layers"))
    assert lines[-1]["router_layers"] == [1, 3] and max(lines[-1]["router_bias_max"]) > 0
    assert (out / "bias-run" / "ckpt" / "step_40" / "model" / "dropup" / "router_bias.safetensors").exists()
    print("GPU smoke of issue 15 (granular, mixed layers, bias balancing): passed")


def issue16():
    """An MoE expanded x2 by copies (issue 15 item 5) trains from ``model.init`` loaded on the
    meta device straight into GPU memory, with selective activation checkpointing and bf16 AdamW
    moments (one compiled kernel per tensor), compiled, and resumes."""
    shape = Scale(corpus_mb=0, vocab_size=64, hidden=128, d_f=512, layers=4, heads=4, kv_heads=2, seq_len=256,
                  global_batch=16, micro_batch=8, dense_steps=0, moe_steps=0, dense_lr=0, moe_lr=0,
                  eval_interval=0, eval_batches=1)
    dense_init(out / "dense16", shape, vocab=64, seed=0)
    upcycle(out / "dense16", out / "moe4", method="drop", num_experts=4, top_k=2, progress=False)
    upcycle(out / "moe4", out / "moe8", method="naive", num_experts=8, progress=False)  # top-4: exact
    cfg3 = out / "i16.yaml"
    cfg3.write_text(json.dumps({
        "model": {"init": str(out / "moe8")}, "data": {"datasets": [{"path": str(out / "toy")}], "seq_len": 256},
        "batch": {"global_batch": 16, "micro_batch": 8}, "steps": 30,
        "optim": {"lr": 3e-3, "warmup_steps": 5, "state_dtype": "bfloat16"},
        "activation_checkpointing": "selective", "log_interval": 5, "eval_interval": 0, "save_interval": 15,
        "out_dir": str(out / "i16-run")}))
    cmd3 = [sys.executable, "-m", "dropup", "train", "--config", str(cfg3)]
    r = subprocess.run(cmd3, capture_output=True, text=True, env={**os.environ, "TORCH_LOGS": "recompiles"})
    print(r.stdout[-1500:], r.stderr[-3000:])
    assert r.returncode == 0, "issue 16 training failed"
    assert "activation checkpointing (selective)" in r.stdout + r.stderr
    run = out / "i16-run"
    full = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"issue 16 run: loss {full[0]['loss']:.4f} -> {full[-1]['loss']:.4f}, "
          f"{sum('Recompiling' in x for x in r.stderr.splitlines())} recompilations")
    assert full[-1]["loss"] < full[0]["loss"]
    # Resume from step 15: the steps after it again, from the checkpoint's weights and moments.
    shutil.rmtree(run / "ckpt" / "step_30")
    subprocess.run(cmd3 + ["--resume"], check=True, capture_output=True)
    again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [x["loss"] for x in again if x["step"] > 15]
    straight = [x["loss"] for x in full if x["step"] > 15]
    print("resumed losses", [round(v, 6) for v in resumed], "uninterrupted", [round(v, 6) for v in straight],
          "- bit for bit" if resumed == straight else "- NOT bit for bit (information: CUDA kernels may "
          "accumulate in any order)")
    print("GPU smoke of issue 16 (meta loading, selective checkpointing, fused bf16-moment AdamW): passed")


if not ONLY16:
    issue15_and_earlier()
issue16()
