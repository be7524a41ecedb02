#!/usr/bin/env python3
"""Conversion benchmark for `dropup upcycle` (issue 2, part 4).

    python benchmarks/convert_bench.py [--sizes 152m,1.5b] [--workdir DIR] [--keep]

For each size (the paper's dense shapes, see ``dropup.synthetic.PAPER_SHAPES``):

1. write a random dense Llama checkpoint (bf16) into a work directory;
2. ``dropup``: ``dropup.upcycle(src, out, method="drop", ratio=0.5, num_experts=8, top_k=2)``
   (all other options default) in a separate Python process;
3. ``in-memory`` (152m only): the approach of the paper authors' script, in a separate process:
   ``AutoModelForCausalLM.from_pretrained`` the dense model (bf16), ``from_config`` a Mixtral of
   the same shape (bf16), copy the non-FFN tensors, copy the dense FFN into every expert with
   Drop-Upcycling r=0.5 re-initialisation, ``save_pretrained``. For 1.5b it is not run: it needs
   more than the 24 GB of this machine (issue 2: killed for memory at layer 8 of 24);
4. ``cp``: ``cp -r --reflink=never`` of a copy of dropup's output (same bytes, real data) that
   an untimed ``cp`` has just written through the page cache, so much of cp's source is cached
   (dropup writes with direct I/O, which leaves nothing of its own output cached);
5. ``dd``: ``dd if=/dev/zero bs=8M oflag=direct`` of the same byte count: the disk's own speed
   for writes that bypass the page cache, as dropup's do (for information, no target).

Contenders run in this fixed order: dropup, in-memory, cp, dd. The page cache cannot be dropped
without root, so the source checkpoint is warm in the page cache for every contender (it was just
written), and cp reads a just-written, partly cached copy of dropup's output. Before each
contender the benchmark calls sync() (untimed) so one contender's dirty pages are not flushed on
the next one's clock; the time of the sync() right after a contender is reported as ``flush s``
but not counted in ``wall s`` (no contender calls fsync itself).

``wall s`` is measured by this (parent) process around the whole child process, so it includes
the interpreter start and the imports of torch/transformers; ``work s`` is the child's own clock
around the conversion only. Peak RSS is the child's own high-water mark (``VmHWM`` of
/proc/self/status, read in the child at its end; ``ru_maxrss`` is not used because Linux carries
the parent's peak into a child across fork/execve); the parent also polls /proc/PID/status to split it into anonymous memory and
file-backed pages (safetensors memory maps count towards RSS). GB = 10^9 bytes throughout.

Results are printed as a table, checked against the issue's targets (PASS/FAIL) and appended to
``benchmarks/RESULTS.md``. Exit status is 0 when every checked target passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SIZES = ("152m", "1.5b")
NUM_EXPERTS, TOP_K, RATIO = 8, 2, 0.5
DTYPE_BYTES = 2  # bf16
GB = 1e9
PEER_SIZES = {"152m"}  # the in-memory peer needs > 24 GB for 1.5b (issue 2)
MARGIN = 2 * 1024**3  # free-disk slack on top of the files the benchmark writes

# Targets of issue 2, part 4.
RSS_LIMIT_GB = {"152m": 0.5, "1.5b": 1.0}
CP_FACTOR = 1.5


# --------------------------------------------------------------------------------------------
# Child processes: run one contender, print one JSON line with the child's own measurements.
# --------------------------------------------------------------------------------------------

def _maxrss_kib() -> int:
    """This process's peak RSS in KiB: VmHWM, the high-water mark of its own address space.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the parent's peak RSS over fork and
    execve into it, so a child of this (torch-importing) benchmark would report the parent's peak
    whenever that is higher than its own.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child_result(t_work: float, t_import: float, import_rss: int, extra: dict | None = None) -> None:
    res = {"work_s": t_work, "peak_rss_kib": _maxrss_kib(), "import_s": t_import,
           "import_rss_kib": import_rss}
    res.update(extra or {})
    print("BENCH-RESULT " + json.dumps(res), flush=True)


def child_dropup(src: str, out: str) -> None:
    t0 = time.perf_counter()
    import dropup

    t_import, import_rss = time.perf_counter() - t0, _maxrss_kib()
    t0 = time.perf_counter()
    prov = dropup.upcycle(src, out, method="drop", ratio=RATIO, num_experts=NUM_EXPERTS,
                          top_k=TOP_K, progress=False)
    _child_result(time.perf_counter() - t0, t_import, import_rss, {"output_bytes": prov["output_bytes"]})


def _drop_reinit(w, axis: int, ratio: float, gen):
    """Drop-Upcycling on one dense FFN matrix: floor(r*d_f) neurons re-drawn from N(mean, std^2)
    of the replaced slice (per-matrix index sets, slice statistics: the authors' script)."""
    import torch

    d_f = w.shape[axis]
    idx = torch.randperm(d_f, generator=gen)[: int(ratio * d_f)]
    part = w.index_select(axis, idx).float()
    new = torch.empty(part.shape).normal_(part.mean().item(), part.std().item(), generator=gen)
    out = w.clone()
    out.index_copy_(axis, idx, new.to(w.dtype))
    return out


def child_peer(src: str, out: str) -> None:
    """The in-memory approach: whole dense model and whole MoE resident in RAM."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    t_import, import_rss = time.perf_counter() - t0, _maxrss_kib()
    t0 = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    dc = dense.config
    cfg = MixtralConfig(
        vocab_size=dc.vocab_size, hidden_size=dc.hidden_size, intermediate_size=dc.intermediate_size,
        num_hidden_layers=dc.num_hidden_layers, num_attention_heads=dc.num_attention_heads,
        num_key_value_heads=dc.num_key_value_heads, head_dim=getattr(dc, "head_dim", None),
        hidden_act=dc.hidden_act, max_position_embeddings=dc.max_position_embeddings,
        rms_norm_eps=dc.rms_norm_eps, tie_word_embeddings=dc.tie_word_embeddings,
        bos_token_id=dc.bos_token_id, eos_token_id=dc.eos_token_id,
        rope_parameters=getattr(dc, "rope_parameters", None),
        num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, router_aux_loss_coef=0.02,
        dtype=torch.bfloat16,
    )
    moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    d_f = dc.intermediate_size
    with torch.no_grad():
        moe.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight)
        moe.model.norm.weight.copy_(dense.model.norm.weight)
        if not dc.tie_word_embeddings:
            moe.lm_head.weight.copy_(dense.lm_head.weight)
        for dl, ml in zip(dense.model.layers, moe.model.layers):
            ml.self_attn.load_state_dict(dl.self_attn.state_dict())
            ml.input_layernorm.weight.copy_(dl.input_layernorm.weight)
            ml.post_attention_layernorm.weight.copy_(dl.post_attention_layernorm.weight)
            g, u, d = dl.mlp.gate_proj.weight, dl.mlp.up_proj.weight, dl.mlp.down_proj.weight
            ex = ml.mlp.experts  # fused in transformers 5: gate_up_proj [E, 2 d_f, d_h], down_proj [E, d_h, d_f]
            for e in range(NUM_EXPERTS):
                ex.gate_up_proj[e, :d_f].copy_(_drop_reinit(g, 0, RATIO, gen))
                ex.gate_up_proj[e, d_f:].copy_(_drop_reinit(u, 0, RATIO, gen))
                ex.down_proj[e].copy_(_drop_reinit(d, 1, RATIO, gen))
        # Sanity (cheap): half of expert 0's gate rows in layer 0 are the dense rows.
        same = (moe.model.layers[0].mlp.experts.gate_up_proj[0, :d_f]
                == dense.model.layers[0].mlp.gate_proj.weight).all(dim=1).float().mean().item()
        if abs(same - (1 - RATIO)) > 0.01:
            raise SystemExit(f"in-memory peer: {same:.3f} of expert rows intact, expected {1 - RATIO}")
    moe.save_pretrained(out)
    _child_result(time.perf_counter() - t0, t_import, import_rss, {"intact_rows": same})


# --------------------------------------------------------------------------------------------
# Parent: orchestration, measurement, table, RESULTS.md.
# --------------------------------------------------------------------------------------------

def _status_kib(pid: int) -> dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    vals[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return vals


def run_measured(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """Run ``cmd``; wall time measured here, memory split polled from /proc, child JSON parsed."""
    os.sync()  # untimed: do not charge this contender for the previous one's dirty pages
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "VmHWM": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for k, v in _status_kib(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    t1 = time.perf_counter()
    os.sync()
    flush = time.perf_counter() - t1
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    res: dict = {"wall_s": wall, "flush_s": flush, "poll_kib": peaks}
    for line in stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            res.update(json.loads(line.removeprefix("BENCH-RESULT ")))
    if "peak_rss_kib" in res:
        res["rss_gb"] = res["peak_rss_kib"] * 1024 / GB
    else:  # cp: the parent's polling is all there is
        res["rss_gb"] = max(peaks["VmHWM"], peaks["VmRSS"]) * 1024 / GB
    return res


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_bytes(cfg: dict) -> tuple[int, int]:
    """(dense bytes, MoE bytes) of a bf16 Llama config and its 8-expert Mixtral."""
    h, f, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    attn = 2 * h * h + 2 * h * kv + 2 * h
    ffn = 3 * h * f
    rest = v * h * (1 if cfg["tie_word_embeddings"] else 2) + h
    dense = rest + layers * (attn + ffn)
    moe = rest + layers * (attn + NUM_EXPERTS * ffn + NUM_EXPERTS * h)
    return dense * DTYPE_BYTES, moe * DTYPE_BYTES


def versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    import dropup

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "dropup": dropup.__version__}


def source_revision() -> str:
    """The git commit of the dropup sources measured, and whether src/dropup had local changes."""
    repo = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes in src/" if dirty else "")


def machine() -> dict[str, str]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"uname": " ".join(platform.uname()), "cores": str(os.cpu_count()),
            "ram": f"{mem / 1024**3:.1f} GiB", "cpu": cpu}


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def make_table(rows: list[list[str]], header: list[str] | None = None) -> str:
    header = header or ["size", "contender", "wall s", "work s", "flush s", "peak RSS GB",
                        "anon / file GB", "output GB", "vs in-memory (time, RSS)", "time vs cp"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [fmt_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt_row(r, widths) for r in rows]
    return "\n".join(lines)


def _combine(runs: list[dict]) -> dict:
    """Repeats of one contender: median of the times, max of the memory figures."""
    import statistics

    out = dict(runs[-1])
    for k in ("wall_s", "work_s", "flush_s"):
        if k in out:
            out[k] = statistics.median(r[k] for r in runs)
    out["rss_gb"] = max(r["rss_gb"] for r in runs)
    out["poll_kib"] = {k: max(r["poll_kib"][k] for r in runs) for k in runs[-1]["poll_kib"]}
    out["walls"] = [r["wall_s"] for r in runs]
    return out


def bench_size(size: str, root: Path, python: str, env: dict, repeat: int,
               log) -> tuple[list[list[str]], list[tuple[str, bool, str]], list[str]]:
    from dropup.hub.synthetic import PAPER_SHAPES, llama_config, write_synthetic_dense

    cfg = llama_config(**PAPER_SHAPES[size])
    src, out, peer_out, cp_out, stage = (root / f"{size}-{n}" for n in
                                         ("dense", "dropup", "inmemory", "cp", "cp-source"))
    notes = [f"{size}: load average before: {loadavg()}"]
    log(f"[{size}] writing synthetic dense checkpoint (bf16) to {src} ...")
    t0 = time.perf_counter()
    write_synthetic_dense(src, cfg, dtype="bfloat16")
    log(f"[{size}] dense checkpoint: {dir_bytes(src) / GB:.2f} GB in {time.perf_counter() - t0:.1f} s")

    me = [python, str(Path(__file__).resolve()), "_child"]
    runs: dict[str, list[dict]] = {"dropup": [], "peer": [], "cp": [], "dd": []}
    for rep in range(repeat):
        tag = f"[{size}]" + (f" run {rep + 1}/{repeat}" if repeat > 1 else "")
        shutil.rmtree(out, ignore_errors=True)
        log(f"{tag} dropup upcycle (drop, r={RATIO}, {NUM_EXPERTS} experts, top-{TOP_K}) ...")
        r = run_measured([*me, "dropup", str(src), str(out)], "dropup", env)
        r["out_gb"] = dir_bytes(out) / GB
        runs["dropup"].append(r)
        log(f"{tag} dropup: {r['wall_s']:.1f} s, {r['rss_gb']:.3f} GB peak RSS")

        if size in PEER_SIZES:
            log(f"{tag} in-memory peer (from_pretrained + from_config + copy + save_pretrained) ...")
            r = run_measured([*me, "peer", str(src), str(peer_out)], "in-memory peer", env)
            r["out_gb"] = dir_bytes(peer_out) / GB
            runs["peer"].append(r)
            log(f"{tag} in-memory: {r['wall_s']:.1f} s, {r['rss_gb']:.3f} GB peak RSS")
            shutil.rmtree(peer_out, ignore_errors=True)

        log(f"{tag} cp -r --reflink=never of a just-written copy of dropup's output ...")
        # dropup writes with direct I/O, so its output is not in the page cache. cp is timed the
        # way it was before dropup did that: copying a directory that was just written through
        # the page cache (by an untimed cp here), so much of its source is still cached: cp's
        # favourable case (measured 7-12 s on this machine; copying a source read back from disk
        # or crowded by a full page cache took 17-22 s).
        subprocess.run(["cp", "-r", "--reflink=never", str(out), str(stage)], check=True)
        r = run_measured(["cp", "-r", "--reflink=never", str(stage), str(cp_out)], "cp")
        shutil.rmtree(stage, ignore_errors=True)
        r["out_gb"] = dir_bytes(cp_out) / GB
        runs["cp"].append(r)
        log(f"{tag} cp: {r['wall_s']:.1f} s")
        shutil.rmtree(cp_out, ignore_errors=True)

        # the disk's own speed for the same bytes, written the way dropup writes (direct I/O)
        nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        dd_out = root / f"{size}-dd.bin"
        r = run_measured(["dd", "if=/dev/zero", f"of={dd_out}", "bs=8M", "oflag=direct",
                          f"count={-(-nbytes // (8 << 20))}", "status=none"], "dd")
        r["out_gb"] = dd_out.stat().st_size / GB
        runs["dd"].append(r)
        log(f"{tag} dd oflag=direct: {r['wall_s']:.1f} s")
        dd_out.unlink()
    notes.append(f"{size}: load average after: {loadavg()}")
    r_drop, r_cp, r_dd = _combine(runs["dropup"]), _combine(runs["cp"]), _combine(runs["dd"])
    r_peer = _combine(runs["peer"]) if runs["peer"] else None
    if repeat > 1:
        for name, r in (("dropup", r_drop), ("in-memory", r_peer), ("cp", r_cp), ("dd", r_dd)):
            if r:
                notes.append(f"{size}: {name} wall s per run: " + ", ".join(f"{w:.2f}" for w in r["walls"]))
    for name, r in (("dropup", r_drop), ("in-memory", r_peer)):
        if r and "import_rss_kib" in r:
            notes.append(f"{size}: {name} child RSS after its imports (before converting): "
                         f"{r['import_rss_kib'] * 1024 / GB:.3f} GB, imports took {r['import_s']:.2f} s")

    def mem_split(r: dict) -> str:
        p = r["poll_kib"]
        return f"{p['RssAnon'] * 1024 / GB:.2f} / {p['RssFile'] * 1024 / GB:.2f}"

    def row(name: str, r: dict, vs_peer: str, vs_cp: str) -> list[str]:
        work = f"{r['work_s']:.2f}" if "work_s" in r else "-"
        return [size, name, f"{r['wall_s']:.2f}", work, f"{r['flush_s']:.2f}", f"{r['rss_gb']:.3f}",
                mem_split(r), f"{r['out_gb']:.2f}", vs_peer, vs_cp]

    rows = []
    vs_peer = "-"
    if r_peer:
        vs_peer = (f"{r_drop['wall_s'] / r_peer['wall_s']:.2f}x, "
                   f"{r_drop['rss_gb'] / r_peer['rss_gb']:.2f}x")
    rows.append(row("dropup", r_drop, vs_peer, f"{r_drop['wall_s'] / r_cp['wall_s']:.2f}x"))
    if r_peer:
        rows.append(row("in-memory (transformers)", r_peer, "1.00x, 1.00x",
                        f"{r_peer['wall_s'] / r_cp['wall_s']:.2f}x"))
    else:
        rows.append([size, "in-memory (transformers)", "not run: needs > 24 GB", "-", "-", "-", "-",
                     "-", "-", "-"])
    rows.append(row("cp -r (same bytes)", r_cp, "-", "1.00x"))
    rows.append(row("dd oflag=direct (same bytes)", r_dd, "-", f"{r_dd['wall_s'] / r_cp['wall_s']:.2f}x"))
    notes.append(f"{size}: dropup takes {r_drop['wall_s'] / r_dd['wall_s']:.2f}x the time of writing "
                 "the same bytes of zeros with direct I/O (dd bs=8M oflag=direct: the disk's speed)")

    checks = []
    lim = RSS_LIMIT_GB[size]
    checks.append((f"{size}: dropup peak RSS <= {lim} GB", r_drop["rss_gb"] <= lim,
                   f"{r_drop['rss_gb']:.3f} GB"))
    if size == "152m":
        checks.append(("152m: dropup faster than in-memory", r_drop["wall_s"] < r_peer["wall_s"],
                       f"{r_drop['wall_s']:.2f} s vs {r_peer['wall_s']:.2f} s"))
        checks.append(("152m: dropup less peak RSS than in-memory", r_drop["rss_gb"] < r_peer["rss_gb"],
                       f"{r_drop['rss_gb']:.3f} GB vs {r_peer['rss_gb']:.3f} GB"))
    floor_s, rate, torch_rate, backend = rng_floor_s(cfg)
    notes.append(f"{size}: drop r={RATIO} draws {draws(cfg) / 1e9:.2f} G normal values; dropup's "
                 f"sampler ({backend} backend) runs at {rate / 1e9:.3f} G/s per core here, torch's "
                 f"CPU normal_ at {torch_rate / 1e9:.3f} G/s (measured in this run), so drawing "
                 f"them alone needs {floor_s:.1f} s on all {os.cpu_count()} cores = "
                 f"{floor_s / r_cp['wall_s']:.2f}x cp's time")
    if size == "1.5b":
        checks.append(("1.5b: dropup finishes", True, f"{r_drop['out_gb']:.2f} GB written"))
        checks.append((f"1.5b: dropup time <= {CP_FACTOR}x cp", r_drop["wall_s"] <= CP_FACTOR * r_cp["wall_s"],
                       f"{r_drop['wall_s']:.2f} s vs {CP_FACTOR}x {r_cp['wall_s']:.2f} s = "
                       f"{CP_FACTOR * r_cp['wall_s']:.2f} s ({r_drop['wall_s'] / r_cp['wall_s']:.2f}x)"))
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows, checks, notes


def draws(cfg: dict) -> int:
    """Random values Drop-Upcycling draws: floor(r d_f) neurons x d_h x 3 matrices x E x layers."""
    return (int(RATIO * cfg["intermediate_size"]) * cfg["hidden_size"] * 3 * NUM_EXPERTS
            * cfg["num_hidden_layers"])


def rng_floor_s(cfg: dict) -> tuple[float, float, float, str]:
    """Time to draw the normal values alone, on every core, with dropup's sampler and with torch's.

    Measures ``dropup.gauss.gaussian`` (the counter-based sampler dropup draws with; bfloat16 out,
    as the conversion does) and torch's CPU ``normal_`` (what it drew with before), one thread
    each, best of three 64M-value draws, assuming perfect scaling over the cores.
    Returns (dropup's floor s, dropup's rate, torch's rate, dropup's sampler backend).
    """
    import torch

    from dropup.convert import gauss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        f32, b16 = torch.empty(1 << 26), torch.empty(1 << 26, dtype=torch.bfloat16)
        best = {"dropup": float("inf"), "torch": float("inf")}
        for rep in range(3):
            t0 = time.perf_counter()
            gauss.gaussian(b16.shape, 0.0, 1.0, rep, torch.bfloat16, out=b16)
            t1 = time.perf_counter()
            f32.normal_(0.0, 1.0, generator=gen)
            t2 = time.perf_counter()
            best["dropup"] = min(best["dropup"], t1 - t0)
            best["torch"] = min(best["torch"], t2 - t1)
    finally:
        torch.set_num_threads(threads)
    ours, theirs = f32.numel() / best["dropup"], f32.numel() / best["torch"]
    return draws(cfg) / (ours * (os.cpu_count() or 1)), ours, theirs, gauss.backend()


def append_results(text: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Conversion benchmark results\n\n"
            "Appended by `benchmarks/convert_bench.py` (see its docstring for the method): wall time "
            "and peak RSS of `dropup upcycle` (drop, r=0.5, 8 experts, top-2) against the in-memory "
            "transformers approach of the paper authors' script and against `cp` of the same bytes. "
            "GB = 10^9 bytes. Newest runs at the bottom.\n")
    with open(RESULTS, "a") as f:
        f.write("\n" + text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        kind, src, out = argv[1:4]
        {"dropup": child_dropup, "peer": child_peer}[kind](src, out)
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="152m,1.5b", help="comma-separated, of: " + ", ".join(SIZES))
    ap.add_argument("--workdir", default="/work/bench-tmp",
                    help="where checkpoints are written (a per-run subdirectory is created)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the contenders N times (same order each time); report median times "
                         "and max peak RSS")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        ap.error(f"--sizes: unknown {bad}; choose from {', '.join(SIZES)}")

    from dropup.hub.synthetic import PAPER_SHAPES, llama_config

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Peak disk use is per size (each size is deleted before the next one starts).
    need = 0
    for s in sizes:
        dense_b, moe_b = checkpoint_bytes(llama_config(**PAPER_SHAPES[s]))
        need = max(need, dense_b + 3 * moe_b + (moe_b if s in PEER_SIZES else 0) + MARGIN)
    free = shutil.disk_usage(workdir).free
    if free < need:
        print(f"convert_bench: not enough free disk in {workdir}: need about {need / GB:.1f} GB "
              f"(source + dropup output + cp copy + slack), {free / GB:.1f} GB free. "
              "Free space or pass --workdir on a larger disk.", file=sys.stderr)
        return 2
    root = workdir / f"convert-bench-{os.getpid()}"
    rev = source_revision()
    root.mkdir()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"convert_bench: work dir {root} ({free / GB:.1f} GB free, needs about {need / GB:.1f} GB)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    python = sys.executable
    all_rows, all_checks, all_notes = [], [], []
    try:
        for s in sizes:
            rows, checks, notes = bench_size(s, root, python, env, max(1, args.repeat), log)
            all_rows += rows
            all_checks += checks
            all_notes += notes
    finally:
        if args.keep:
            log(f"convert_bench: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    table = make_table(all_rows)
    check_lines = [f"- {'PASS' if ok else 'FAIL'}: {name} ({detail})" for name, ok, detail in all_checks]
    print(table)
    print()
    print("\n".join(check_lines))
    notes_text = "\n".join(f"- {n}" for n in all_notes)
    print()
    print(notes_text)

    if not args.no_results:
        m, v = machine(), versions()
        cmd = "python benchmarks/convert_bench.py " + " ".join(shlex.quote(a) for a in argv)
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (
            f"## {now}: {', '.join(sizes)}\n\n"
            f"- command: `{cmd.strip()}`\n"
            f"- machine: `{m['uname']}`; {m['cores']} cores ({m['cpu']}), {m['ram']} RAM\n"
            f"- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n"
            f"- dropup source: git {rev} (at start)\n"
            f"- repeats: {max(1, args.repeat)} (times are medians, peak RSS the max over repeats)\n"
            "- conditions: source checkpoint warm in the page cache for all contenders (just written, "
            "caches cannot be dropped without root); contenders run in the order dropup, in-memory, cp, dd; "
            "sync() before each contender untimed; `flush s` = sync() right after it, not in `wall s`; "
            "`wall s` includes interpreter start and imports, `work s` is the conversion call only; "
            "peak RSS = child's VmHWM (own high-water mark), anon/file split polled from /proc/PID/status; cp reads a copy of dropup's "
            "output as just written by an untimed cp (partly cached, cp's favourable case).\n\n"
            f"{table}\n\n" + "\n".join(check_lines) + "\n\nNotes:\n\n" + notes_text + "\n")
        append_results(text)
        log(f"convert_bench: appended to {RESULTS}")
    return 0 if all(ok for _, ok, _ in all_checks) else 1


if __name__ == "__main__":
    sys.exit(main())
