#!/usr/bin/env python3
"""Speed of `dropup analyze routing` (issue 13, item 4): the paper's 8x152M shape over 3 domains.

    python benchmarks/analysis_bench.py [--tiny] [--tokens N] [--repeat R] [--no-record]

Builds a random MoE of the ``moe-8x152m`` preset (8 experts, top-2, 12 layers; bf16 safetensors
written by ``dropup.model.io.save_model``) and three synthetic token datasets (``write_dataset``,
uniform random ids, 200k val tokens each), then times ``analyze_routing`` end to end (checkpoint
loading, the forward passes, counting, routing.json, figures and report) with its defaults: seq
len 1024, batch 8, bf16 on CUDA. The first run includes CUDA start-up; the table shows every run.
``--tiny`` (implied without a GPU) uses the ``moe-tiny`` preset on the CPU (20k tokens per domain)
so it runs in seconds anywhere. The table is printed and appended to RESULTS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from convert_bench import append_results, machine, source_revision, versions  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dropup.analysis.specialisation import RoutingOptions, analyze_routing  # noqa: E402
from dropup.data.tokens import write_dataset  # noqa: E402
from dropup.hub.config import ModelConfig  # noqa: E402
from dropup.model.decoder import build_model  # noqa: E402
from dropup.analysis.evaluate import EvalOptions, evaluate  # noqa: E402
from dropup.model.io import save_model  # noqa: E402
from dropup.model.presets import PRESETS  # noqa: E402

DOMAINS = ("code", "prose", "c")


def build_inputs(root: Path, preset: str, vocab: int | None, tokens: int, device: str,
                 seed: int = 0) -> tuple[Path, list[Path]]:
    hf = dict(PRESETS[preset])
    if hf.get("vocab_size") is None:
        hf["vocab_size"] = vocab
    cfg = ModelConfig.from_hf(hf)
    torch.manual_seed(seed)
    model = build_model(cfg, device=device)  # random init on the GPU: seconds, not minutes
    save_model(model, root / "moe", dtype=torch.bfloat16)
    rng = np.random.default_rng(seed)
    data = []
    for i, name in enumerate(DOMAINS):
        # each domain draws from its own half-overlapping id range, so domains differ a little
        lo = i * cfg.vocab_size // 4
        toks = rng.integers(lo, lo + cfg.vocab_size // 2, tokens + 1)
        data.append(write_dataset(root / name, {"val": [toks]}, cfg.vocab_size, domain=name))
    return root / "moe", data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the moe-tiny preset on the CPU (seconds)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per domain (200k; tiny 20k)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs (default 2)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    a = ap.parse_args(argv)
    if not a.tiny and not torch.cuda.is_available():
        print("no CUDA device: timing the tiny shape on the CPU instead (--tiny)", flush=True)
        a.tiny = True
    preset = "moe-tiny" if a.tiny else "moe-8x152m"
    tokens = a.tokens or (20_000 if a.tiny else 200_000)
    device = "cpu" if a.tiny else "cuda"
    rows = []
    with tempfile.TemporaryDirectory(prefix="analysis-bench-") as tmp:
        t = time.perf_counter()
        moe, data = build_inputs(Path(tmp), preset, 4096, tokens, device)
        build_s = time.perf_counter() - t
        for r in range(a.repeat):
            out = Path(tmp) / f"out{r}"
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            res = analyze_routing(RoutingOptions([moe], data, str(out), tokens=tokens, device=device,
                                                 batch_size=a.batch_size))
            wall = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
            m = res["models"][0]
            rows.append(["analyze routing", preset, device, res["dtype"], str(r + 1), f"{len(DOMAINS)} x {tokens}",
                         str(res["seq_len"]), str(a.batch_size), f"{wall:.2f}",
                         f"{len(DOMAINS) * tokens / wall / 1e3:.0f}", f"{peak:.2f}", f"JSD {m['mean_jsd']:.4f}"])
            print(" | ".join(rows[-1]), flush=True)
        for r in range(a.repeat):  # dropup eval on the same model and tokens, for comparison
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            rep = evaluate(EvalOptions([str(moe)], [str(d) for d in data], tokens=tokens, seq_len=res["seq_len"],
                                       batch_size=a.batch_size, device=device, progress=False))
            wall = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
            rows.append(["eval", preset, device, rep["options"]["dtype"], str(r + 1), f"{len(DOMAINS)} x {tokens}",
                         str(res["seq_len"]), str(a.batch_size), f"{wall:.2f}", f"{len(DOMAINS) * tokens / wall / 1e3:.0f}",
                         f"{peak:.2f}", f"loss {rep['models'][0]['macro']['loss']:.4f}"])
            print(" | ".join(rows[-1]), flush=True)
    head = ["command", "model", "device", "dtype", "run", "tokens", "seq len", "batch", "wall s", "k tok/s",
            "peak GPU GB", "result"]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    table = "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])
    print(table)
    if not a.no_record:
        m, ver = machine(), versions()
        gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
        append_results(
            f"## analysis_bench.py, {_dt.datetime.now().isoformat(timespec='seconds')}\n\n"
            f"`analyze_routing` end to end (load, forward, counts, routing.json, figures, report), then `dropup "
            f"eval` (loss over the same tokens), on a random "
            f"{preset} (bf16 checkpoint, built in {build_s:.1f} s) over {len(DOMAINS)} synthetic domains. "
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']}, GPU {gpu}; "
            f"{', '.join(f'{k} {v}' for k, v in ver.items())}; dropup {source_revision()}.\n"
            f"Command: `{shlex.join([sys.executable, *sys.argv])}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
