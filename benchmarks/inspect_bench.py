#!/usr/bin/env python3
"""How long `dropup inspect` takes on SmolLM2-135M upcycled to 8 experts (issue 12, item 4).

    python benchmarks/inspect_bench.py [--workdir DIR]

Builds a random dense llama of SmolLM2-135M's shape (30 layers, hidden 576, intermediate 1536,
vocabulary 49152, tied embeddings), upcycles it to 8 experts (naive and drop r=0.5, bf16 and
fp32), and times, each in its own process: `dropup inspect` (similarity pass included), the
`--no-similarity` floor (reading headers and provenance), and a straightforward reference
(every expert pair compared on its own, in float64, neuron equality by direct comparison) over
the first REF_LAYERS layers, scaled to all 30. The table is printed and appended to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from convert_bench import append_results, loadavg, machine, source_revision, versions  # noqa: E402

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
CASES = [("naive", "bfloat16"), ("drop", "bfloat16"), ("naive", "float32"), ("drop", "float32")]
REF_LAYERS = 2

_REFERENCE = """
import sys, time, torch
from dropup.hub.safetensors import CheckpointReader
from dropup.hub import names
ck = CheckpointReader(sys.argv[1])
for layer in range(int(sys.argv[2])):
    ex = [[ck.get(names.expert_name('mixtral', layer, e, m)) for m in ('gate', 'up', 'down')] for e in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            a, b = ex[i], ex[j]
            dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
            same = ((a[0] == b[0]).all(1) & (a[1] == b[1]).all(1) & (a[2] == b[2]).all(0)).double().mean()
"""


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall and CPU seconds (user + system) of a child process, and its stdout. CPU time is
    quoted beside wall time because the machine may be shared: waiting for a core is wall time
    but not CPU time."""
    t, c = time.perf_counter(), _child_cpu()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t, _child_cpu() - c, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    from dropup import upcycle
    from dropup.hub.synthetic import llama_config, write_synthetic_dense

    work = Path(tempfile.mkdtemp(prefix="inspect-", dir=a.workdir))
    rows = []
    try:
        dense = write_synthetic_dense(work / "dense", llama_config(**SHAPE))
        for method, dtype in CASES:
            out = work / f"{method}-{dtype}"
            upcycle(dense, out, method=method, ratio=0.5, dtype=dtype, progress=False)
            cli = [sys.executable, "-m", "dropup", "inspect", str(out), "--json"]
            floor, floor_cpu, _ = timed([*cli, "--no-similarity"])
            fast, fast_cpu, _ = timed(cli)
            scale = SHAPE["num_hidden_layers"] / REF_LAYERS
            ref, ref_cpu, _ = timed([sys.executable, "-c", _REFERENCE, str(out), str(REF_LAYERS)])
            # the reference's process also starts Python and reads headers: the floor, not scaled
            ref, ref_cpu = floor + (ref - floor) * scale, floor_cpu + (ref_cpu - floor_cpu) * scale
            rows.append([method, dtype, f"{floor:.1f} / {floor_cpu:.1f}", f"{fast:.1f} / {fast_cpu:.1f}",
                         f"{ref:.0f} / {ref_cpu:.0f}",
                         f"{(ref - floor) / (fast - floor):.1f}x / {(ref_cpu - floor_cpu) / (fast_cpu - floor_cpu):.1f}x"])
            print(" | ".join(rows[-1]), flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = ["method", "dtype", "--no-similarity s (wall / CPU)", "inspect s (wall / CPU)",
            f"pairwise reference s ({REF_LAYERS} layers, scaled to 30)", "similarity pass: reference / inspect"]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    table = "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])
    print(table)
    m, ver = machine(), versions()
    load = loadavg()
    print(f"load average at the end: {load}")
    append_results(
        f"## inspect_bench.py, {_dt.datetime.now().isoformat(timespec='seconds')}\n\n"
        f"`dropup inspect` on a random llama of SmolLM2-135M's shape upcycled to 8 experts "
        f"({json.dumps(SHAPE)}); wall time of the whole process. Machine: {m['cpu']}, {m['cores']} "
        f"cores, {m['ram']}, load average at the end {load} (other jobs shared the machine); {', '.join(f'{k} {v}' for k, v in ver.items())}; dropup {source_revision()}.\n"
        f"Command: `{shlex.join([sys.executable, *sys.argv])}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
