#!/usr/bin/env python3
"""Host memory of loading a checkpoint for training (issue 16, item 3): whole model vs meta device.

    python benchmarks/load_memory.py [--checkpoint DIR | --preset moe-8x1.5b [--vocab N]] [--device auto|cpu|cuda]
        [--workdir DIR] [--keep] [--smoke] [--no-results]

Without ``--checkpoint`` it writes a random Hugging Face checkpoint of ``--preset`` (a name of
``dropup.model.presets.PRESETS``; default the paper's 8x1.5B: Mixtral, 24 layers, hidden 2048,
d_f 7168, 16 heads (8 kv), vocabulary 48,640, 8 experts top-2; 8.96B parameters) in bf16, one
tensor at a time (``write_random_checkpoint``: host memory stays at one tensor). Then it loads it
for training twice, each in a fresh process, in this order:

- ``whole``: what ``dropup train`` did before issue 16: ``load_model`` on the CPU in fp32, then
  ``.to(device)``;
- ``meta``: what it does now: the trainer's ``make_model`` (``meta_model``) and ``place_model``
  (one process: ``load_into`` materialises the model on the device and reads the checkpoint
  tensor by tensor straight into it).

For each it reports the wall time of the process (interpreter start and imports included), the
load alone, and peak host RSS: the child's own ``VmHWM`` taken right after the load (see
``convert_bench.py`` on why not ``ru_maxrss``), split into anonymous and file-backed pages by
polling /proc (safetensors memory maps count as file pages). Both children then digest their
parameters on the device (float64 sum and sum of squares per tensor): the two loads must agree
exactly. On CUDA the issue's target is checked: ``meta`` peak RSS <= checkpoint size + 2 GB.
``--smoke`` writes the ``moe-tiny`` preset (vocabulary 512) and runs in seconds on a CPU. The table
is printed and appended to RESULTS.md unless ``--no-results``. GB = 10^9 bytes. Exit status 1 when
a check fails.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from convert_bench import (  # noqa: E402
    GB,
    _maxrss_kib,
    append_results,
    dir_bytes,
    machine,
    make_table,
    run_measured,
    source_revision,
    versions,
)

LIMIT_SLACK = 2e9  # the target: meta's peak RSS at most the checkpoint's size plus 2 GB
WAYS = ("whole", "meta")


def write_checkpoint(out: Path, preset: str, vocab: int | None, seed: int = 0) -> Path:
    """A random bf16 checkpoint of ``preset`` under the Hub's names, written tensor by tensor."""
    import torch
    from transformers import __version__ as tf_version

    from dropup.hub.config import ModelConfig
    from dropup.hub.safetensors import check_free_space
    from dropup.hub.synthetic import write_random_checkpoint
    from dropup.model.decoder import CausalLM
    from dropup.model.io import to_hf_state_dict
    from dropup.model.presets import PRESETS

    hf = dict(PRESETS[preset])
    hf["vocab_size"] = vocab or hf["vocab_size"]
    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):  # the shapes only: no storage
        shapes = {k: tuple(v.shape) for k, v in to_hf_state_dict(CausalLM(cfg).state_dict(), cfg).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out, 2 * sum(math.prod(s) for s in shapes.values()) + 2**30)
    return write_random_checkpoint(out, cfg.to_hf(dtype="bfloat16", transformers_version=tf_version), shapes,
                                   "bfloat16", seed)


def child(way: str, ckpt: str, device_name: str) -> None:
    """Load ``ckpt`` for training one way; print the measurements and the parameters' digest."""
    t0 = time.perf_counter()
    import torch

    if way == "whole":
        from dropup.model.io import load_model
    else:
        from dropup.model.io import meta_model
        from dropup.train.loop import Dist, place_model

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context's host memory is not the load's: in import_rss
    t_import, import_rss = time.perf_counter() - t0, _maxrss_kib()
    t1 = time.perf_counter()
    if way == "whole":
        model = load_model(ckpt, device="cpu", dtype=torch.float32).to(device)
    else:
        model = place_model(meta_model(ckpt, dtype=torch.float32), Dist(0, 1, device), bf16=True, init=ckpt)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_work, peak = time.perf_counter() - t1, _maxrss_kib()
    digest = {n: _digest(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    res = {"work_s": t_work, "peak_rss_kib": peak, "import_s": t_import, "import_rss_kib": import_rss,
           "params": sum(p.numel() for p in model.parameters()), "digest": digest}
    print("BENCH-RESULT " + json.dumps(res), flush=True)


def _digest(t) -> list[float]:
    """Sum and sum of squares in float64, 2^20 elements at a time: the polled memory stays the load's."""
    chunks = t.detach().reshape(-1).split(1 << 20)
    parts = [(c.double().sum().item(), c.double().square().sum().item()) for c in chunks]
    return [sum(a for a, _ in parts), sum(b for _, b in parts)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        child(*argv[1:4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="load this Hugging Face checkpoint instead of writing one")
    from dropup.model.presets import PRESETS

    ap.add_argument("--preset", default="moe-8x1.5b", choices=sorted(PRESETS), help="the shape to write")
    ap.add_argument("--vocab", type=int, help="another vocabulary size (e.g. 99584, train_bench's 8x1.5b-4l)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the checkpoint is written")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    ap.add_argument("--smoke", action="store_true", help="the moe-tiny shape (vocabulary 512): seconds on a CPU")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)

    import torch

    from dropup.errors import UserError

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    preset, vocab = ("moe-tiny", args.vocab or 512) if args.smoke else (args.preset, args.vocab)
    root = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        root = Path(args.workdir) / f"load-memory-{os.getpid()}"
        t0 = time.perf_counter()
        try:
            ckpt = write_checkpoint(root / preset, preset, vocab)
        except UserError as e:
            shutil.rmtree(root, ignore_errors=True)
            print(f"load_memory: {e} (--workdir)", file=sys.stderr)
            return 2
        print(f"load_memory: wrote {ckpt} ({dir_bytes(ckpt) / GB:.2f} GB) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    try:
        size = dir_bytes(ckpt)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for way in WAYS:
            try:
                results[way] = run_measured([sys.executable, __file__, "_child", way, str(ckpt), device], way, env)
            except RuntimeError as e:  # e.g. the whole fp32 model does not fit this host: the other way still runs
                failed[way] = str(e).splitlines()[0] + (" (killed: out of memory?)" if "exit -9" in str(e) else "")
                print(f"load_memory: {e}", file=sys.stderr, flush=True)
    finally:
        if root is not None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    rows = []
    for way in WAYS:
        r = results.get(way)
        if r is None:
            rows.append([way, failed[way], "", "", "", ""])
            continue
        split = f"{r['poll_kib']['RssAnon'] * 1024 / GB:.2f} / {r['poll_kib']['RssFile'] * 1024 / GB:.2f}"
        rows.append([way, f"{r['wall_s']:.1f}", f"{r['work_s']:.1f}", f"{r['rss_gb']:.2f}",
                     f"{r['import_rss_kib'] * 1024 / GB:.2f}", split])
    table = make_table(rows, ["way", "wall s", "load s", "peak RSS GB", "RSS after imports GB", "anon / file GB"])
    checks = []
    if len(results) == len(WAYS):
        checks.append(("both loads give the same parameters and buffers",
                       results["whole"]["digest"] == results["meta"]["digest"],
                       f"{len(results['meta']['digest'])} tensors' digests"))
    limit = size + LIMIT_SLACK
    meta = results.get("meta")
    if device == "cuda" or meta is None:
        rss = meta["rss_gb"] if meta else float("nan")
        checks.append((f"meta peak RSS <= checkpoint + 2 GB = {limit / GB:.2f} GB", rss * GB <= limit,
                       f"{rss:.2f} GB" if meta else failed["meta"]))
    check_lines = [f"- {'PASS' if ok else 'FAIL'}: {name} ({detail})" for name, ok, detail in checks]
    params = next(iter(results.values()))["params"] if results else float("nan")
    head = (f"{ckpt.name}: {params / 1e6:,.1f}M parameters, {size / GB:.2f} GB on disk; "
            f"loaded in fp32 on {device}")
    print(head + "\n\n" + table + "\n\n" + "\n".join(check_lines))
    if not args.no_results:
        m, v = machine(), versions()
        cmd = "python benchmarks/load_memory.py " + " ".join(shlex.quote(a) for a in argv)
        gpu = f"; {torch.cuda.get_device_name()}" if device == "cuda" else ""
        append_results(
            f"## load_memory.py, {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S')}\n\n"
            f"- command: `{cmd.strip()}`\n"
            f"- machine: `{m['uname']}`; {m['cores']} cores ({m['cpu']}), {m['ram']} RAM{gpu}\n"
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n"
            f"- dropup source: git {source_revision()}\n"
            f"- {head}; whole = load_model on the CPU then .to(device) (the trainer before issue 16), "
            "meta = meta_model + place_model (now); each in a fresh process; peak RSS = the child's VmHWM "
            "right after the load, anon / file split polled from /proc\n\n"
            f"{table}\n\n" + "\n".join(check_lines) + "\n")
    return 0 if results and all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
