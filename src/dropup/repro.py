"""`dropup repro`: the paper's claims C1-C8 (issue 14) measured on one machine, phase by phase.

OUT holds one directory per phase's outputs and ``phases/<name>.json``, the phase's ``done``
marker, written last (atomically) with everything later phases and the report read from it; a
phase whose marker exists is skipped, so ``--resume`` after a kill re-runs only unfinished
phases and the finished phases' numbers are the very ones recorded before. The corpus, tokenizer,
dense-model and training helpers are demo.py's (one home); the verdicts are pure functions of the
numbers (``judge``), so they can be tested on hand-made numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from dropup.errors import UserError
from dropup.hub.atomic import atomic_write_text
from dropup.pipeline import (Scale, build_data, dense_init, evaluate_models, fit_eval, routing_summary,
                             steady_tokens_per_s, train_run, val_curve)

# Upcycling options per method (dropup.convert.upcycle.UpcycleOptions' fields).
METHODS = {
    "naive": dict(method="naive"),
    "drop-0.5": dict(method="drop", ratio=0.5, index_sampling="shared"),
    "drop-0.5-per-matrix": dict(method="drop", ratio=0.5, index_sampling="per-matrix"),
    "drop-1.0": dict(method="drop", ratio=1.0),
    "noise": dict(method="noise"),
    "scratch": dict(method="scratch"),
    "btx": dict(method="btx"),  # sources: the seed's per-domain branches
}
SECOND_SEED = ("naive", "drop-0.5")  # re-run with seed + 1 to size the seed-to-seed noise
# ``--set variant.KEY=VALUE``: one more MoE, upcycled as drop-0.5 with these options changed and
# trained like the others (an ablation beside the paper's methods; no claim is judged on it).
VARIANT = "variant"
VARIANT_BASE = "drop-0.5"
# Options the study itself sets for every construction; a variant changes how experts are built.
STUDY_OWNED = ("num_experts", "top_k", "seed", "sources", "overwrite", "progress", "verify", "verify_text",
               "threads", "max_shard_size", "dtype")


@dataclass
class Preset:
    name: str
    scale: Scale
    branch_steps: int  # btx: steps of each single-domain branch of the seed
    routing_tokens: int  # validation tokens per domain for the routing analysis (at most the split)
    device: str = "cpu"
    nproc: int = 1  # training processes per phase (> 1: torchrun, FSDP2; one per GPU)
    num_experts: int = 8
    top_k: int = 2
    methods: tuple[str, ...] = tuple(METHODS)
    variant: dict = dataclasses.field(default_factory=dict)  # see VARIANT
    note: str = ""

    @property
    def tokens_per_step(self) -> int:
        return self.scale.tokens_per_step

    def validate(self) -> None:
        s = self.scale
        problems = []
        if s.global_batch % s.micro_batch:
            problems.append(f"micro_batch {s.micro_batch} does not divide global_batch {s.global_batch}")
        if s.hidden % s.heads or s.heads % s.kv_heads:
            problems.append("heads must divide hidden and kv_heads must divide heads")
        for k in ("dense_steps", "moe_steps", "corpus_mb", "eval_batches", "dense_lr", "moe_lr"):
            if not getattr(s, k) > 0:
                problems.append(f"{k} must be positive")
        # Curves: at least two evaluations during MoE training besides the one at its end.
        if not (0 < s.eval_interval and 2 * s.eval_interval < s.moe_steps):
            problems.append("eval_interval must be positive and below half of moe_steps")
        if not (self.branch_steps > 0 and self.routing_tokens > 1):
            problems.append("branch_steps and routing_tokens must be positive")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append("top_k must lie in 1..num_experts")
        if self.device not in ("cpu", "cuda"):
            problems.append("device must be cpu or cuda")
        if self.nproc < 1 or s.global_batch % (self.nproc * s.micro_batch):
            problems.append(f"nproc must be positive and nproc x micro_batch divide global_batch {s.global_batch}")
        unknown = set(self.methods) - set(METHODS)
        if unknown or not set(SECOND_SEED) <= set(self.methods):
            problems.append(f"methods must be among {', '.join(METHODS)} and include {', '.join(SECOND_SEED)}")
        if problems:
            raise UserError(f"preset {self.name}: " + "; ".join(problems))


# The presets. A study trains the seed (dense), 3 BTX branches (dense), the seed continued for the
# MoE budget (dense), 7 MoE methods and 2 second-seed MoEs: with M the MoE tokens, S the seed's and
# B a branch's, its training time is (S + 3B + M) / dense rate + 9M / MoE rate. Ratios follow the
# paper: S = 2M (about 1T seed tokens for 500B of MoE training); B = M/3 (the paper gives no branch
# budget; a third of the MoE's, so that the three branches together see what one MoE sees).
# Learning rates: 3e-3 dense and 1e-3 MoE at these small widths (the paper's 3e-4 and 2e-4 are
# for 152M-8.9B parameters at batch 512-1024 x 4096), with a tenth of each phase as warm-up.
PRESETS = {
    # Whole study in < 60 s on 2 CPU cores, for the tests; every method is kept.
    "cpu-tiny": Preset("cpu-tiny", Scale(
        corpus_mb=0.1, vocab_size=320, hidden=32, d_f=64, layers=2, heads=2, kv_heads=1, seq_len=32,
        global_batch=8, micro_batch=8, dense_steps=20, moe_steps=12, dense_lr=3e-3, moe_lr=1e-3,
        eval_interval=4, eval_batches=1), branch_steps=4, routing_tokens=1024,
        note="shapes for the tests only; numbers mean nothing"),
    # One H200, at most 9.5 min wall. Measured on the H200 (2026-12-03, this shape, 20 MoE steps per
    # phase): 1.25M tokens/s dense and 0.70M MoE (compiled, bf16, fused AdamW, steady); fixed costs
    # ~25 s data at 4 MB/domain, ~20 s first compilation, ~6 s per MoE phase (load, evaluations,
    # checkpoint), 15 s routing, 17 s evaluations. With 12 MB/domain (~60 s of data) that leaves
    # about 300 s of training: M = 240 steps x 65,536 = 15.7M tokens, S = 480 steps, B = 80 steps:
    # (31.5 + 15.7 + 15.7) / 1.25 + 9 x 15.7 / 0.70 = 50 + 202 = 252 s.
    "h200-10min": Preset("h200-10min", Scale(
        corpus_mb=12.0, vocab_size=8192, hidden=512, d_f=1536, layers=8, heads=8, kv_heads=4, seq_len=1024,
        global_batch=64, micro_batch=32, dense_steps=480, moe_steps=240, dense_lr=3e-3, moe_lr=1e-3,
        eval_interval=24, eval_batches=8, val_fraction=0.1), branch_steps=80, routing_tokens=200_000,
        device="cuda"),
    # One H200, about an hour: the 8x152M paper shape's width and depth with a small vocabulary at
    # sequence 1024. Rates measured on the H200 (2026-12-03, this preset with 21 MoE steps per
    # phase, 353 s): 0.77-0.81M tokens/s dense, 0.39-0.45M MoE (steady); ~15 s of fixed cost per
    # MoE phase (its 330M-parameter checkpoint). M = 840 steps x 131,072 = 110M tokens, S = 2M,
    # B = M/3: (220 + 110 + 110) / 0.8 + 9 x 110 / 0.43 = 550 + 2300 = 2850 s of training, plus
    # ~450 s of data (64 MB/domain: ~19M tokens each, so the seed sees ~4 epochs), start-up,
    # checkpoints, evaluations and routing: ~55 min. The full study is not yet run.
    "h200-1h": Preset("h200-1h", Scale(
        corpus_mb=64.0, vocab_size=16384, hidden=512, d_f=2048, layers=12, heads=8, kv_heads=8, seq_len=1024,
        global_batch=128, micro_batch=32, dense_steps=1680, moe_steps=840, dense_lr=3e-3, moe_lr=1e-3,
        eval_interval=70, eval_batches=8, val_fraction=0.05), branch_steps=280, routing_tokens=500_000,
        device="cuda", note="budgets from rates measured on the H200; the full study is not yet run"),
    # The paper's 8x152M study (its shapes and recipe: sequence 4096, batch 512, 500B MoE tokens,
    # 1T seed tokens, 2,000 warm-up steps) on 8 GPUs. Its cost, from benchmarks/RESULTS.md's H200
    # rates at this shape (dense 152M ~428k, MoE 8x152M ~310k tokens/s per GPU): seed 649 h,
    # dense-continued 324 h, branches 324 h, 9 MoE runs 4,032 h: about 5,330 H200-hours (about 28
    # days on 8 GPUs), 4,680 with --seed-model. It needs a corpus far beyond what any machine
    # holds: pass prepared datasets with --data (and --seed-model for their tokenizer).
    "paper-8x152m": Preset("paper-8x152m", Scale(
        corpus_mb=1000.0, vocab_size=99_584, hidden=512, d_f=2048, layers=12, heads=8, kv_heads=8, seq_len=4096,
        global_batch=512, micro_batch=8, dense_steps=476_837, moe_steps=238_419, dense_lr=3e-4, moe_lr=2e-4,
        eval_interval=2000, eval_batches=8, val_fraction=0.01, warmup_steps=2000), branch_steps=79_473,
        routing_tokens=1_000_000, device="cuda", nproc=8,
        note="the paper's scale: about 5,330 H200-hours; give it --data and --seed-model"),
}


def with_overrides(preset: Preset, sets: list[str]) -> Preset:
    """``--set key=value``: a Preset or Scale field, converted to the field's type; or
    ``variant.KEY=VALUE``, an upcycling option of the extra variant MoE (value read as YAML)."""
    scale, top, variant = {}, {}, dict(preset.variant)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set moe_steps=100")
        if key.startswith(VARIANT + "."):
            variant[key.removeprefix(VARIANT + ".")] = yaml.safe_load(value)
            continue
        target = scale if key in Scale.__dataclass_fields__ else top
        obj = preset.scale if target is scale else preset
        if key not in type(obj).__dataclass_fields__ or key in ("name", "scale", "methods", "variant"):
            raise UserError(f"--set {key}: unknown key; choose a field of the preset table (src/dropup/repro.py)")
        cur = getattr(obj, key)
        try:
            target[key] = type(cur)(value)
        except ValueError:
            raise UserError(f"--set {item}: {value!r} is not a {type(cur).__name__}") from None
    out = dataclasses.replace(preset, scale=dataclasses.replace(preset.scale, **scale), variant=variant, **top)
    out.validate()
    return out


def variant_options(variant: dict) -> dict:
    """The variant's upcycling options (drop-0.5's, changed by ``variant``), checked now, before
    hours of training: an unknown option, one the study sets itself, or a bad value is one line."""
    from dropup.convert.upcycle import UpcycleOptions

    for key in variant:
        if key not in UpcycleOptions.__dataclass_fields__ or key in STUDY_OWNED:
            settable = sorted(set(UpcycleOptions.__dataclass_fields__) - set(STUDY_OWNED))
            raise UserError(f"--set {VARIANT}.{key}: not an upcycling option a variant can change; "
                            f"choose one of {', '.join(settable)}")
    opts = {**METHODS[VARIANT_BASE], **variant}
    if opts.get("method") == "btx":
        raise UserError(f"--set {VARIANT}.method=btx: BTX is in the study already; a variant takes one source")
    UpcycleOptions(**opts).validate()
    return opts


# ---------------------------------------------------------------------------------------------
# Verdicts: pure functions of the numbers. Each returns (verdict, reason).

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"


def _order_verdict(values: dict[str, float], order: list[str], spread: float, what: str) -> tuple[str, str]:
    """``order`` should be ascending in ``values``; a step smaller than the spread is noise."""
    pairs = list(zip(order, order[1:]))
    gaps = {(a, b): values[b] - values[a] for a, b in pairs}
    shown = ", ".join(f"{k}={values[k]:.4f}" for k in order)
    if all(g > spread for g in gaps.values()):
        return HELD, f"{what}: {shown} (every step > seed spread {spread:.4f})"
    if any(g < -spread for g in gaps.values()):
        bad = next(f"{a} >= {b}" for (a, b), g in gaps.items() if g < -spread)
        return NOT_HELD, f"{what}: {shown}; {bad} beyond the seed spread {spread:.4f}"
    return INCONCLUSIVE, f"{what}: {shown}; a difference is within the seed spread {spread:.4f}"


def _lowest_verdict(values: dict[str, float], winners: list[str], spread: float, what: str) -> tuple[str, str]:
    """Is the best of ``winners`` lower than every other entry, beyond the spread?"""
    best_w = min(winners, key=values.__getitem__)
    others = {k: v for k, v in values.items() if k not in winners}
    best_o = min(others, key=others.__getitem__)
    gap = others[best_o] - values[best_w]
    shown = f"best of {'/'.join(winners)}: {best_w}={values[best_w]:.4f}; best other: {best_o}={others[best_o]:.4f}"
    if gap > spread:
        return HELD, f"{what}: {shown} (gap {gap:.4f} > seed spread {spread:.4f})"
    if gap < -spread:
        return NOT_HELD, f"{what}: {shown} (gap {gap:.4f}, beyond seed spread {spread:.4f})"
    return INCONCLUSIVE, f"{what}: {shown} (gap {gap:.4f} within seed spread {spread:.4f})"


def judge(m: dict) -> dict[str, tuple[str, str]]:
    """The verdicts of C1-C8 from the measured numbers ``m``:
    dense (mean val loss of the seed), start/early/end ({run: mean loss}: at step 0, the first saved
    checkpoint, the end), spread/early_spread/start_spread (seed-to-seed), dense_continued (end),
    moe_at_dense_flops ({run: loss at the dense run's training FLOPs}), jsd/dead ({run: number})."""
    v = {}
    s, d = m["start"], m["dense"]
    tol = max(1e-3, 1e-4 * abs(d))
    if abs(s["naive"] - d) > tol:
        v["C1"] = (NOT_HELD, f"step 0: naive {s['naive']:.4f} differs from dense {d:.4f}")
    else:
        verdict, reason = _order_verdict({"dense": d, **s}, ["dense", "drop-0.5", "drop-1.0"], m["start_spread"],
                                         "step 0")
        v["C1"] = (verdict, f"naive {s['naive']:.4f} = dense; " + reason)
    moe = {k: x for k, x in m["end"].items()}
    v["C2"] = _lowest_verdict(m["early"], [k for k in ("naive", "btx") if k in m["early"]], m["early_spread"],
                              "first evaluation")
    v["C3"] = _lowest_verdict(moe, ["drop-0.5"], m["spread"], "end")
    v["C4"] = _order_verdict(moe, ["drop-0.5", "drop-1.0", "scratch"], m["spread"], "end")
    worst = max(moe, key=moe.__getitem__)
    gap = moe["scratch"] - max(x for k, x in moe.items() if k != "scratch")
    v["C5"] = ((HELD if gap > m["spread"] else NOT_HELD if gap < -m["spread"] else INCONCLUSIVE),
               f"end: scratch={moe['scratch']:.4f}, highest is {worst}={moe[worst]:.4f}; "
               f"scratch minus the highest other {gap:.4f}, seed spread {m['spread']:.4f}")
    jsd, dead = m["jsd"], m["dead"]
    jsd_spread = m.get("jsd_spread", 0.0)
    below = all(jsd["naive"] + jsd_spread < jsd[k] for k in ("drop-0.5", "scratch"))
    above = all(jsd["naive"] > jsd[k] + jsd_spread for k in ("drop-0.5", "scratch"))
    more_dead = all(dead["naive"] > dead[k] for k in ("drop-0.5", "scratch"))
    shown = (f"JSD naive={jsd['naive']:.4f}, drop-0.5={jsd['drop-0.5']:.4f}, scratch={jsd['scratch']:.4f} "
             f"(seed spread {jsd_spread:.4f}); dead experts naive={dead['naive']}, drop-0.5={dead['drop-0.5']}, "
             f"scratch={dead['scratch']}")
    v["C6"] = (HELD if below and more_dead else NOT_HELD if above else INCONCLUSIVE, shown)
    a, b = moe["drop-0.5"], moe["drop-0.5-per-matrix"]
    lower = "shared" if a < b else "per-matrix"
    v["C7"] = ((INCONCLUSIVE, f"shared {a:.4f} vs per-matrix {b:.4f}: within seed spread {m['spread']:.4f}")
               if abs(a - b) <= m["spread"] else
               (HELD, f"{lower} ends lower: shared {a:.4f} vs per-matrix {b:.4f} (seed spread {m['spread']:.4f}); "
                "the paper states no direction, 'held' means the two differ"))
    dc = m["dense_continued"]
    tok = {k: x - dc for k, x in moe.items() if k != "scratch"}
    flo = {k: x - dc for k, x in m["moe_at_dense_flops"].items() if k != "scratch"}
    beat_tok = all(g < -m["spread"] for g in tok.values())
    beat_flo = all(g < -m["spread"] for g in flo.values())
    lose = any(g > m["spread"] for g in list(tok.values()) + list(flo.values()))
    v["C8"] = (HELD if beat_tok and beat_flo else NOT_HELD if lose else INCONCLUSIVE,
               "MoE minus dense-continued at equal tokens: " + ", ".join(f"{k} {g:+.4f}" for k, g in tok.items())
               + "; at equal training FLOPs: " + ", ".join(f"{k} {g:+.4f}" for k, g in flo.items())
               + f" (seed spread {m['spread']:.4f})")
    return v


CLAIMS = {
    "C1": "At step 0 naive upcycling equals the dense loss; r = 0.5 and r = 1.0 start above it, in that order.",
    "C2": "Early in MoE training naive upcycling and BTX have the lowest validation loss.",
    "C3": "At the end Drop-Upcycling r = 0.5 has the lowest mean validation loss (its curve crosses naive's).",
    "C4": "r = 1.0 ends between r = 0.5 and from-scratch.",
    "C5": "From-scratch ends last among the MoE methods.",
    "C6": "Routing: naive's mean cross-domain JSD is far below Drop-Upcycling's and from-scratch's, "
          "with many more dead experts (Figure 5).",
    "C7": "Shared vs per-matrix index sets (unpublished): which ends lower, and how their routing differs.",
    "C8": "Every upcycled MoE vs the dense seed trained on for the same tokens, at equal tokens and FLOPs.",
}


# ---------------------------------------------------------------------------------------------
# Phases.

class _Study:
    def __init__(self, out: Path, preset: Preset):
        self.out, self.p = out, preset
        (out / "phases").mkdir(parents=True, exist_ok=True)
        self.ran: list[str] = []

    def phase(self, name: str, outputs: list[Path], fn) -> dict:
        """Run ``fn`` unless ``phases/name.json`` exists; an unfinished phase's outputs are removed first."""
        marker = self.out / "phases" / f"{name}.json"
        if marker.exists():
            return json.loads(marker.read_text())
        for o in outputs:
            if o.is_dir():
                shutil.rmtree(o)
            elif o.exists():
                o.unlink()
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        record = fn()
        record["seconds"] = time.perf_counter() - t0
        atomic_write_text(marker, json.dumps(record, indent=1) + "\n")
        self.ran.append(name)
        return record

    def train(self, name: str, init: Path, data: dict[str, Path], steps: int, lr: float, seed: int) -> dict:
        """A training phase; its validation curve is the trainer's own evaluation every
        eval_interval steps (the windows ``evaluate_models`` scores: see ``fit_eval``), so no
        intermediate checkpoint is written."""
        run = self.out / "runs" / name

        def go():
            final = train_run(run, init, data, self.p.scale, steps, lr, seed, device=self.p.device, nproc=self.p.nproc)
            return {"run": str(run), "final": str(final), "tokens": steps * self.p.tokens_per_step,
                    "steady_tokens_per_s": steady_tokens_per_s(run), "curve": val_curve(run)}

        return self.phase(f"train-{name}", [run, run.with_suffix(".yaml")], go)


def _flops_per_token(cfg, top_k: int, num_experts: int | None) -> float:
    """6 x active parameters (the usual training estimate): attention, embeddings and top-k FFNs."""
    h, L, f, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    attn = L * (2 * h * h + 2 * h * kv)
    ffn = L * 3 * h * f * (top_k if num_experts else 1)
    return 6.0 * (attn + ffn + 2 * v * h)


def _interp(curve: list[dict], tokens: float) -> float:
    """Mean loss at ``tokens``, linear in log tokens between evaluations (clamped at the ends)."""
    pts = [(c["tokens"], c["mean"]) for c in curve if c["tokens"] > 0]
    if tokens <= pts[0][0]:
        return pts[0][1]
    for (t0, y0), (t1, y1) in zip(pts, pts[1:]):
        if tokens <= t1:
            w = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return y0 + w * (y1 - y0)
    return pts[-1][1]


def _prepare_out(out: Path, resume: bool, record: dict) -> None:
    stamp = out / "repro.json"
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise UserError(f"{out} is not empty; pass --resume to continue that study or choose another --out")
        if not stamp.exists():
            raise UserError(f"{out} holds no dropup repro study (no repro.json); choose another --out")
        if json.loads(stamp.read_text()) != json.loads(json.dumps(record)):
            raise UserError(f"{out} was started with another preset, --set, --seed or --seed-model; "
                            "resume it with the same ones")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(record, indent=1) + "\n")


def _check_seed_model(path: str) -> Path:
    from dropup.model.io import load_config

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"--seed-model {path}: not a Hugging Face checkpoint directory (no config.json)")
    if not (p / "tokenizer.json").is_file():
        raise UserError(f"--seed-model {path}: no tokenizer.json beside the model; the study tokenizes its "
                        "corpus with the seed model's own tokenizer")
    if load_config(p).is_moe:
        raise UserError(f"--seed-model {path}: an MoE checkpoint; the study upcycles a dense model")
    return p.resolve()


def _check_datasets(paths: list[str], seed_model: Path | None) -> dict[str, Path]:
    from dropup.data.tokens import read_meta

    data = {}
    for path in paths:
        p = Path(path)
        if not (p / "meta.json").is_file():
            raise UserError(f"--data {path}: not a dataset written by `dropup data prepare` (no meta.json)")
        if "val" not in read_meta(p)["splits"]:
            raise UserError(f"--data {path}: no val split; prepare it with --val-fraction above 0")
        if p.resolve().name in data:
            raise UserError(f"--data {path}: two datasets are named {p.resolve().name}; the study names domains "
                            "by their directories, so give each a distinct name")
        data[p.resolve().name] = p.resolve()
    if data and seed_model is None:
        raise UserError("--data needs --seed-model: a dense seed trained here uses the tokenizer trained here")
    return data


def run_repro(out: str | Path, preset: str = "cpu-tiny", resume: bool = False, sets: list[str] | None = None,
              seed: int = 0, command: str = "", seed_model: str | None = None, datasets: list[str] = ()) -> dict:
    from dropup.convert.upcycle import upcycle
    from dropup.model.io import load_config

    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
    p = with_overrides(PRESETS[preset], sets or [])
    if p.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"preset {p.name} needs a CUDA GPU; use --preset cpu-tiny or --set device=cpu")
    if p.variant:
        variant_options(p.variant)
    user_seed = _check_seed_model(seed_model) if seed_model else None
    given = _check_datasets(list(datasets), user_seed)
    out = Path(out)
    _prepare_out(out, resume, {"preset": asdict(p), "seed": seed,
                               "seed_model": str(user_seed) if user_seed else None,
                               "data": {d: str(x) for d, x in given.items()}})
    st = _Study(out, p)
    t_start = time.perf_counter()

    rec = st.phase("data", [out / "corpus", out / "tokenizer", out / "data"], lambda: {"data": {
        d: str(x) for d, x in (given or build_data(out, p.scale, seed, tokenizer=user_seed)).items()}})
    data = {d: Path(x) for d, x in rec["data"].items()}
    s = fit_eval(p.scale, data)
    st.p = p = dataclasses.replace(p, scale=s)
    if user_seed is None:
        vocab = json.loads((next(iter(data.values())) / "meta.json").read_text())["vocab_size"]
        rec = st.phase("dense-init", [out / "dense-init"],
                       lambda: {"path": str(dense_init(out / "dense-init", s, vocab, seed))})
        seed_run = st.train("seed", Path(rec["path"]), data, s.dense_steps, s.dense_lr, seed)
        dense = Path(seed_run["final"])
    else:
        dense = user_seed

    runs: dict[str, dict] = {}  # name -> {init, phase record}
    branches = []
    if "btx" in p.methods:
        for d in data:
            branches.append(Path(st.train(f"branch-{d}", dense, {d: data[d]}, p.branch_steps, s.moe_lr, seed)["final"]))
    jobs = [(m, seed, m) for m in p.methods] + [(m, seed + 1, f"{m}-s{seed + 1}") for m in SECOND_SEED]
    if p.variant:
        jobs.append((VARIANT, seed, VARIANT))
    for method, sd, name in jobs:
        init = out / "inits" / name
        opts = variant_options(p.variant) if method == VARIANT else dict(METHODS[method])
        src = dense
        if method == "btx":  # the paper's 4 sources: the seed and its branches, 2 experts each of 8
            opts["sources"] = [str(b) for b in branches]
        st.phase(f"upcycle-{name}", [init], lambda: {"upcycling": upcycle(
            src, init, num_experts=p.num_experts, top_k=p.top_k, seed=sd, progress=False, **opts)["method"]})
        runs[name] = {"init": init, **st.train(name, init, data, s.moe_steps, s.moe_lr, sd)}
    # The seed trained on for the MoEs' tokens, in the same data order.
    runs["dense-continued"] = {"init": dense, **st.train("dense-continued", dense, data, s.moe_steps, s.moe_lr, seed)}

    dense_eval = st.phase("eval-dense", [], lambda: {"eval": evaluate_models([dense], data, s, p.device)[0]})["eval"]
    curves = {}
    for name, r in runs.items():
        # Step 0 and the end in float32 by `dropup eval`; between them the trainer's evaluations.
        e = st.phase(f"eval-{name}", [], lambda: {"evals": evaluate_models([r["init"], Path(r["final"])], data, s,
                                                                           p.device)})
        start, end = ({"step": step, "tokens": step * p.tokens_per_step, **x}
                      for step, x in zip((0, s.moe_steps), e["evals"]))
        curves[name] = [start, *(c for c in r["curve"] if c["step"] < s.moe_steps), end]

    moes = [n for n in runs if n != "dense-continued"]
    routing = st.phase("routing", [out / "routing"], lambda: routing_summary(
        {n: Path(runs[n]["final"]) for n in moes}, data, s, out / "routing", p.device, p.routing_tokens))

    # Numbers and verdicts.
    start = {n: curves[n][0]["mean"] for n in moes}
    early = {n: curves[n][1]["mean"] for n in p.methods}
    end = {n: curves[n][-1]["mean"] for n in p.methods}
    pairs = [(m, f"{m}-s{seed + 1}") for m in SECOND_SEED]
    spread = max(abs(curves[a][-1]["mean"] - curves[b][-1]["mean"]) for a, b in pairs)
    early_spread = max(abs(curves[a][1]["mean"] - curves[b][1]["mean"]) for a, b in pairs)
    start_spread = max(abs(curves[a][0]["mean"] - curves[b][0]["mean"]) for a, b in pairs)
    jsd_spread = max(abs(routing["mean_jsd"][a] - routing["mean_jsd"][b]) for a, b in pairs)
    dense_cfg, moe_cfg = load_config(dense), load_config(runs["naive"]["init"])
    ratio = _flops_per_token(dense_cfg, p.top_k, None) / _flops_per_token(moe_cfg, p.top_k, p.num_experts)
    dc_tokens = runs["dense-continued"]["tokens"]
    at_flops = {n: _interp(curves[n], dc_tokens * ratio) for n in p.methods}
    numbers = {"dense": dense_eval["mean"], "start": start, "early": early, "end": end, "spread": spread,
               "early_spread": early_spread, "start_spread": start_spread, "jsd": routing["mean_jsd"],
               "dead": routing["dead_experts"], "jsd_spread": jsd_spread,
               "dense_continued": curves["dense-continued"][-1]["mean"], "moe_at_dense_flops": at_flops,
               "dense_to_moe_flops_per_token": ratio}
    crossing = next((c["tokens"] for c, n in zip(curves["drop-0.5"], curves["naive"])
                     if c["tokens"] > 0 and c["mean"] < n["mean"]), None)
    verdicts = judge(numbers)
    # Equal-weight mixture: each domain gets 1/len(data) of a run's tokens.
    train_tokens = {d: json.loads((x / "meta.json").read_text())["splits"]["train"]["tokens"] for d, x in data.items()}
    budgets = ([("seed", s.dense_steps)] if user_seed is None else []) + [("moe", s.moe_steps)]
    epochs = {phase: {d: steps * p.tokens_per_step / len(data) / n for d, n in train_tokens.items()}
              for phase, steps in budgets}
    phases = {f.stem: json.loads(f.read_text()) for f in sorted((out / "phases").glob("*.json"))}
    results = {"preset": asdict(p), "seed": seed, "seed_model": str(user_seed) if user_seed else None,
               "command": command, "numbers": numbers, "curves": curves, "crossing_tokens": crossing,
               "epochs": epochs, "verdicts": {k: {"verdict": a, "reason": b} for k, (a, b) in verdicts.items()},
               "phase_seconds": {k: v["seconds"] for k, v in phases.items()},
               "throughput": {k.removeprefix("train-"): {"phase": v["tokens"] / v["seconds"],
                                                          "steady": v["steady_tokens_per_s"]}
                              for k, v in phases.items() if k.startswith("train-")},
               "routing_tokens": routing["tokens"], "routing_table": routing["table"],
               "environment": _environment(), "phases_run_now": st.ran, "seconds_now": time.perf_counter() - t_start}
    _figures(out, curves, list(data))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "report.md", format_report(results))
    print(f"wrote {out / 'report.md'}")
    for k, (a, b) in verdicts.items():
        print(f"{k}: {a}: {b}")
    return results


def _environment() -> dict:
    import transformers

    from dropup._version import __version__

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "transformers": transformers.__version__, "dropup": __version__, "cpu": platform.processor(),
           "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _figures(out: Path, curves: dict[str, list[dict]], domains: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*domains, "mean"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for name, c in curves.items():
            pts = [(x["tokens"], x["mean"] if k == "mean" else x["loss"][k]) for x in c if x["tokens"] > 0]
            ax.plot(*zip(*pts), marker=".", label=name, linestyle="--" if name.endswith("-s1") else "-")
        _log_tokens(ax)
        ax.set_title(k)
    axes[0][0].set_ylabel("validation loss")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss_per_domain.png", dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    base = {x["tokens"]: x["mean"] for x in curves["naive"]}
    for name, c in curves.items():
        pts = [(x["tokens"], x["mean"] - base[x["tokens"]]) for x in c if x["tokens"] in base and x["tokens"] > 0]
        if name != "naive" and pts:
            ax.plot(*zip(*pts), marker=".", label=name)
    ax.axhline(0, color="k", linewidth=0.8)
    _log_tokens(ax)
    # Differences of a few hundredths next to from-scratch's nats: linear within +-0.1, log beyond.
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylabel("mean val loss minus naive (symlog)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "diff_to_naive.png", dpi=80)
    plt.close(fig)


def _log_tokens(ax) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # the 2x10^6, 3x10^6, ... labels overlap
    ax.set_xlabel("tokens")


def format_report(r: dict) -> str:
    n = r["numbers"]
    seed = f"the dense model {r['seed_model']}" if r["seed_model"] else "a dense seed trained here"
    lines = [f"# dropup repro: preset {r['preset']['name']}", "",
             f"Command: `{r['command']}`", "", f"Every MoE starts from {seed}.", "",
             *([f"Variant (an extra MoE, no claim judged on it): {VARIANT_BASE} with "
                + ", ".join(f"{k}={v}" for k, v in r["preset"]["variant"].items()) + ".", ""]
               if r["preset"]["variant"] else []), "Numbers are mean validation loss over the domains (nats/token), the "
             "same windows of each domain's validation split at every point: step 0 and the end by `dropup eval` "
             "(float32), the points between by the trainer's own evaluation (bf16 autocast on a GPU). The seed "
             "spread is the largest |seed 0 - seed 1| difference of naive and drop-0.5.", "",
             "![loss per domain](loss_per_domain.png)", "", "![difference to naive](diff_to_naive.png)", "",
             "Routing of the final MoEs ([routing/report.md](routing/report.md)): the Figure 5 grid",
             "", "![routing grid](routing/shares.png)", "", "and the cross-domain JSD per layer", "",
             "![JSD per layer](routing/jsd.png)", ""]
    for k, text in CLAIMS.items():
        v = r["verdicts"][k]
        lines += [f"## {k}", "", f"Paper: {text}", "", f"Measured: {v['reason']}", "", f"Verdict: **{v['verdict']}**", ""]
        if k == "C3":
            lines += [f"drop-0.5 first below naive at tokens: {r['crossing_tokens']}", ""]
    first = next(iter(r["curves"].values()))[1]["tokens"]
    lines += ["## All numbers", "", f"| run | step 0 | first evaluation ({first:,} tokens) | end |", "|---|---|---|---|"]
    for name, c in r["curves"].items():
        lines.append(f"| {name} | {c[0]['mean']:.4f} | {c[1]['mean']:.4f} | {c[-1]['mean']:.4f} |")
    lines += ["", f"Dense seed: {n['dense']:.4f}; seed spread at end {n['spread']:.4f}.", "",
              "## Routing of the final MoEs", "", f"On {r['routing_tokens']:,} validation tokens per domain.", "",
              r["routing_table"], "", "## Phases", "",
              "Training tokens/s: over the whole phase (start-up, compilation, evaluations and the checkpoint "
              "included) and steady (the median of the trainer's logged rate after its first log window). "
              "For comparison, benchmarks/train_bench.py measured 309k tokens/s for the 8x152M MoE shape "
              "(compiled, bf16) on an H200 (benchmarks/RESULTS.md).", "",
              "| phase | seconds | tokens/s (phase) | tokens/s (steady) |", "|---|---|---|---|"]
    for k, sec in r["phase_seconds"].items():
        tps = r["throughput"].get(k.removeprefix("train-")) if k.startswith("train-") else None
        cells = ["", ""] if tps is None else [f"{tps['phase']:,.0f}", "" if tps["steady"] is None else f"{tps['steady']:,.0f}"]
        lines.append(f"| {k} | {sec:.1f} | {cells[0]} | {cells[1]} |")
    lines += ["", "Epochs over each domain's training split: " + "; ".join(
        f"{ph}: " + ", ".join(f"{d} {e:.2f}" for d, e in v.items()) for ph, v in r["epochs"].items())]
    lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in r["environment"].items()] + [""]
    return "\n".join(lines)
