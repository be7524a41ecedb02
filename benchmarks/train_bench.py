#!/usr/bin/env python3
"""Training-speed benchmark (issues 5 and 16): dropup against torchtitan and Hugging Face
transformers, same run.

    python benchmarks/train_bench.py [--shapes 8x152m,152m,8x1.5b-4l,1.5b-4l] [--steps 10]
        [--warmup 3] [--no-hf] [--no-peers | --peers torchtitan,olmo-core] [--no-eager]
        [--no-compile] [--accum N] [--profile] [--full-8x1.5b] [--out DIR] [--smoke]

For each shape it trains with the paper's recipe (bf16 autocast over fp32 master weights, fused
AdamW (0.9, 0.95, eps 1e-8, wd 0.1), gradient clipping 1.0, load-balancing loss 0.02 for MoE) on
random tokens, sequence 4096, and reports the median step time after warm-up, tokens/s, peak GPU
memory, model TFLOP/s with the issue's formula

    FLOPs/token = 6 * (L * (4 h^2 + 3 h d_f k) + h V) + 6 L S h     (k = top-k, 1 for dense)

and that rate as a fraction of the bf16 matmul ceiling measured in the same run (8192^3).
Contenders: dropup eager, dropup with per-layer torch.compile, torchtitan (its Qwen3 model classes
in its own compiled configuration) and OLMo-core (its OLMoE-style model classes, compiled as its
trainer does; see peers.py for both; each skipped when not installed),
transformers (Llama with sdpa for dense; Mixtral with each experts implementation it offers for
MoE). The FLOPs of every contender come from the formula above, so the rates compare work done.

Before timing, dropup's fast path (grouped GEMM, bf16 autocast, compiled) is checked against its
reference path (one matmul per expert, fp32): relative error of the loss, the final hidden states
and every gradient must be <= 1e-2. ``--smoke`` runs tiny shapes on the CPU to test the script.
The table is printed and written to ``OUT/train_bench.md`` (with device, versions and command);
copy it into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dropup.hub.config import ModelConfig  # noqa: E402
from dropup.model.decoder import build_model  # noqa: E402
from dropup.train.losses import load_balancing_loss  # noqa: E402
from dropup.train.optim import AdamW as LowMemAdamW  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

SEQ = 4096
SHAPES = {
    # name: (moe?, layers, hidden, d_f, heads, kv heads, vocab, micro-batch)
    "8x152m": (True, 12, 512, 2048, 8, 8, 99584, 8),
    "152m": (False, 12, 512, 2048, 8, 8, 99584, 8),
    "8x1.5b-4l": (True, 4, 2048, 7168, 16, 16, 99584, 4),
    "1.5b-4l": (False, 4, 2048, 7168, 16, 16, 99584, 4),
}
SMOKE = {
    "8x152m": (True, 2, 64, 128, 4, 4, 512, 2),
    "152m": (False, 2, 64, 128, 4, 4, 512, 2),
}
E, K, AUX = 8, 2, 0.02


def hf_config(name: str, shape: tuple) -> dict:
    moe, layers, h, d_f, heads, kv, vocab, _ = shape
    cfg = dict(vocab_size=vocab, hidden_size=h, intermediate_size=d_f, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=SEQ,
               rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu")
    cfg.setdefault("rope_theta", 10000.0)
    if moe:
        cfg.update(model_type="mixtral", num_local_experts=E, num_experts_per_tok=K,
                   router_aux_loss_coef=AUX, output_router_logits=True)
    else:
        cfg.update(model_type="llama")
    return cfg


def flops_per_token(shape: tuple, seq: int) -> float:
    moe, layers, h, d_f, _, _, vocab, _ = shape
    k = K if moe else 1
    return 6 * (layers * (4 * h * h + 3 * h * d_f * k) + h * vocab) + 6 * layers * seq * h


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def dropup_step_fn(model, moe: bool):
    def step(x, y):
        loss, router_logits = model(x, targets=y, return_router_logits=True)
        if moe:
            c = model.config
            loss = loss + AUX * load_balancing_loss(router_logits, c.num_experts_per_tok, c.num_experts)
        return loss
    return step


def hf_step_fn(model):
    def step(x, y):
        out = model(input_ids=x, labels=x)  # transformers shifts labels itself
        return out.loss  # includes the aux loss when output_router_logits=True
    return step


def build_hf(cfg: dict, impl: str | None, device):
    import transformers

    conf = transformers.AutoConfig.for_model(**cfg)
    kwargs = {"attn_implementation": "sdpa"}
    if impl is not None:
        kwargs["experts_implementation"] = impl
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(conf, dtype=torch.float32, **kwargs)
    return model


def time_training(step_fn, model, shape, device, steps: int, warmup: int,
                  state_dtype: torch.dtype = torch.float32, pre_step=None, fused: bool | None = None,
                  accum: int = 1) -> dict:
    """Median time of one optimizer step of ``accum`` micro-batches (forward and backward each),
    gradient clipping and the update."""
    mb = shape[7]
    vocab = shape[6]
    seq = SEQ if device.type == "cuda" else 64
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if state_dtype == torch.float32:
        opt = torch.optim.AdamW(groups, lr=2e-4, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    else:  # moments stored in bf16 (dropup.optim): 12 instead of 16 bytes per parameter
        opt = LowMemAdamW(groups, lr=2e-4, betas=(0.9, 0.95), eps=1e-8, state_dtype=state_dtype, fused=fused)
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, vocab, (4, mb, seq + 1), device=device, generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        for m in range(accum):
            batch = data[(i * accum + m) % 4]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = step_fn(batch[:, :-1], batch[:, 1:])
            (loss / accum if accum > 1 else loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if pre_step is not None:
            pre_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    t = statistics.median(times)
    tokens = mb * seq * accum
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": t, "tokens_per_s": tokens / t, "accum": accum,
            "tflops": flops_per_token(shape, seq) * tokens / t / 1e12, "peak_gib": peak,
            "loss_last": losses[-1]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_fast_path(shape, device, compile_: bool) -> dict:
    """dropup's fast path against its reference path, under bf16 autocast as in training.

    1. One MoE layer's experts on the same tokens and routing: grouped GEMM (compiled when the
       benchmark compiles) against one matmul per expert; output and gradients of input and
       expert weights.
    2. The whole 2-layer model, fast (grouped, compiled) against reference (per-expert, eager):
       loss, final hidden states and every gradient, with top-k = E. At random initialisation
       routing is a near-tie everywhere and any two implementations (or precisions) flip some
       top-2 choices, a discontinuity that is not an error; routing every token to every expert
       keeps the sort/permute/combine machinery under test without it.
    Limit: relative error <= 1e-2 (outputs: logits and loss; gradients: all parameters' gradient
    as one vector). For information the bf16 fast path against an fp32 reference.
    """
    from dropup.model.decoder import MoE

    moe, layers, h, d_f, heads, kv, vocab, _ = shape
    cfg = ModelConfig.from_hf(hf_config("check", (moe, 2, h, d_f, heads, kv, vocab, 1)))
    amp = device.type == "cuda"
    out = {}
    gen = torch.Generator(device).manual_seed(1)

    # 1. the experts alone
    torch.manual_seed(0)
    layer = MoE(cfg).to(device)
    torch.nn.init.normal_(layer.router.weight, std=0.02)
    for p_ in (layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj):
        torch.nn.init.normal_(p_, std=0.02)
    x = torch.randn(2048, h, device=device, generator=gen)
    with torch.no_grad():
        _, weights, ids = layer.route(x)
    runs = []
    for impl in ("loop", "grouped"):
        layer.impl = impl
        fn = layer.run_experts
        if impl == "grouped" and compile_ and amp:
            fn = torch.compile(layer.run_experts, dynamic=False)
        xi = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = fn(xi, weights, ids)
        y.float().pow(2).sum().backward()
        runs.append((y.detach(), xi.grad, [p_.grad.clone() for p_ in layer.experts.parameters()]))
        layer.zero_grad(set_to_none=True)
    (y0, gx0, gw0), (y1, gx1, gw1) = runs
    out["experts"] = {"out": rel(y1, y0), "grad_x": rel(gx1, gx0),
                      "grad_w_max": max(rel(a, b) for a, b in zip(gw1, gw0))}

    # 2. the model, every token routed to every expert
    all_cfg = ModelConfig.from_hf(dict(hf_config("check", (moe, 2, h, d_f, heads, kv, vocab, 1)),
                                       num_experts_per_tok=E))
    torch.manual_seed(0)
    models = {name: build_model(all_cfg, device=device) for name in ("ref", "fast", "fp32")}
    for name in ("fast", "fp32"):
        models[name].load_state_dict(models["ref"].state_dict())
    models["ref"].set_moe_impl("loop")
    models["fp32"].set_moe_impl("loop")
    models["fast"].set_moe_impl("grouped")
    if compile_ and amp:
        models["fast"].compile_layers()
    tokens = torch.randint(0, vocab, (2, 513), device=device, generator=gen)
    results = {}
    for name, use_amp in (("ref", amp), ("fast", amp), ("fp32", False)):
        model = models[name]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            hidden, _ = model.hidden_states(tokens[:, :-1])
            logits = F.linear(hidden, model.output_weight)
            loss = dropup_step_fn(model, moe)(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = torch.cat([p_.grad.flatten().float() for p_ in model.parameters()])
        results[name] = (logits.detach(), loss.detach(), grads,
                         {n: p_.grad for n, p_ in model.named_parameters()})
    (o0, l0, g0, t0), (o1, l1, g1, t1), (o2, l2, g2, _) = results["ref"], results["fast"], results["fp32"]
    # Pass/fail on the model's outputs (logits, loss) and on its gradient as one vector; the
    # worst single tensor is reported for information (tiny tensors such as norms amplify noise).
    out["model"] = {"logits": rel(o1, o0), "loss": rel(l1, l0), "grad": rel(g1, g0)}
    out["ok"] = all(v <= 1e-2 for part in ("experts", "model") for v in out[part].values())
    out["model_grad_worst_tensor"] = max(rel(t1[n], t0[n]) for n in t0)
    # Both bf16 paths against fp32: is the fast path any further from the exact function than
    # the reference path is? (information; the pass/fail above is unchanged)
    out["bf16_vs_fp32"] = {"fast": {"logits": rel(o1, o2), "loss": rel(l1, l2), "grad": rel(g1, g2)},
                           "reference": {"logits": rel(o0, o2), "loss": rel(l0, l2), "grad": rel(g0, g2)}}
    return out


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_contender(name, make, shape, device, steps, warmup, state_dtype=torch.float32, fused=None,
                  accum: int = 1) -> dict:
    model = step_fn = None
    try:
        model, step_fn, *pre = make()
        r = time_training(step_fn, model, shape, device, steps, warmup, state_dtype, *pre, fused=fused,
                          accum=accum)
    except torch.OutOfMemoryError as e:
        first = str(e).splitlines()[0]
        r = {"error": "out of memory: " + first[:120]}
    except Exception as e:  # noqa: BLE001 - a contender that fails is reported, not fatal
        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    finally:
        model = step_fn = None  # noqa: F841
        free()
    r["contender"] = name
    return r


def bench_shape(sname, shape, device, args) -> list[dict]:
    moe = shape[0]
    cfg_hf = hf_config(sname, shape)
    rows = []

    def dropup_maker(compiled: bool):
        def make():
            torch.manual_seed(0)
            model = build_model(ModelConfig.from_hf(cfg_hf), device=device)
            if compiled:
                model.compile_layers()
            return model, dropup_step_fn(model, moe)
        return make

    if not args.no_dropup:
        if not args.no_eager:
            rows.append(run_contender("dropup (eager)", dropup_maker(False), shape, device, args.steps,
                                      args.warmup))
        if not args.no_compile:
            rows.append(run_contender("dropup (compiled)", dropup_maker(True), shape, device, args.steps,
                                      args.warmup))
        if args.accum > 1:
            how = "eager" if args.no_compile else "compiled"
            rows.append(run_contender(f"dropup ({how}), {args.accum} micro-batches per optimizer step",
                                      dropup_maker(not args.no_compile), shape, device, args.steps,
                                      args.warmup, accum=args.accum))
    if not args.no_peers:
        seq = SEQ if device.type == "cuda" else 64
        compiled = not args.no_compile
        for dist, version, build in peers.installed(args.peers):
            label = (f"{peers.label(dist)} {version} ({'compiled' if compiled else 'eager'}"
                     f"{peers.caveat(dist, moe)})")
            rows.append(run_contender(label, lambda build=build: build(shape, seq, device, compiled),
                                      shape, device, args.steps, args.warmup))
    if not args.no_hf:
        impls = ["eager", "grouped_mm", "batched_mm"] if moe else [None]
        for impl in impls:
            label = f"transformers ({impl or 'sdpa'})"
            rows.append(run_contender(label, lambda impl=impl: (
                (m := build_hf(cfg_hf, impl, device)), hf_step_fn(m)), shape, device, args.steps,
                args.warmup))
    for r in rows:
        r["shape"] = sname
    return rows


# Groups of (AdamW moment dtype, activation checkpointing, first micro-batch, compiled one-kernel
# AdamW update, double?). A doubling group runs micro-batch m, 2m, 4m, ... until one runs out of
# memory or passes FULL_MAX_MB, so its last row that ran is the largest power-of-two micro-batch
# that fits with that setting. Starting points from the 2026-12-03 probe (RESULTS.md).
FULL_PROBE = [
    (torch.bfloat16, "none", 4, False, False),  # the eager optimizer, for the fused update's gain
    (torch.bfloat16, "none", 4, True, True),
    (torch.bfloat16, "selective", 8, True, True),
    (torch.bfloat16, "full", 16, True, True),
    (torch.float32, "none", 1, True, True),
    (torch.float32, "selective", 1, True, True),
    (torch.float32, "full", 2, True, True),
]
FULL_MAX_MB = 64


def probe_groups(groups, run, max_mb: int = FULL_MAX_MB) -> list[dict]:
    """``run(state_dtype, ac, mb, fused)`` for each group's micro-batches (see FULL_PROBE)."""
    out = []
    for state_dtype, ac, mb, fused, double in groups:
        while True:
            r = run(state_dtype, ac, mb, fused)
            r.update(moments=str(state_dtype).removeprefix("torch."), checkpointing=ac, micro_batch=mb,
                     fused_update=fused)
            out.append(r)
            if "error" in r or not double or 2 * mb > max_mb:
                break
            mb *= 2
    return out


def largest_fitting(rows: list[dict], max_mb: int = FULL_MAX_MB) -> list[str]:
    """Per AdamW moment dtype, the largest micro-batch that ran, with which checkpointing, and
    whether twice that ran out of memory (so it is the largest power of two) or was not tried."""
    lines = []
    for moments in ("bfloat16", "float32"):
        ran = [r for r in rows if r.get("moments") == moments and "error" not in r]
        if not any(r.get("moments") == moments for r in rows):
            continue
        if not ran:
            lines.append(f"- largest micro-batch that fits, {moments} AdamW moments: none of those tried")
            continue
        best = max(ran, key=lambda r: r["micro_batch"])
        mb, ac = best["micro_batch"], best["checkpointing"]
        oom = any(r.get("moments") == moments and r["checkpointing"] == ac and r["micro_batch"] == 2 * mb
                  and "error" in r for r in rows)
        why = f"{2 * mb} ran out of memory" if oom else f"{2 * mb} not tried (the probe stops at {max_mb})"
        lines.append(f"- largest micro-batch that fits, {moments} AdamW moments: {mb} "
                     f"(checkpointing {ac}, {best['peak_gib']:.1f} GiB; {why})")
    return lines


def full_8x15b_probe(device, args) -> list[dict]:
    """Does the full 24-layer 8x1.5B (paper shape) train on one GPU, at which micro-batch and
    speed? With fp32 AdamW moments (143 GB of weights, gradients and moments) and with bf16
    moments (107 GB), without and with activation checkpointing; ``--full-groups`` picks groups
    of FULL_PROBE by index (a whole probe is longer than one 10-minute device command)."""
    shape = (True, 24, 2048, 7168, 16, 8, 48640, 1)
    groups = [g for i, g in enumerate(FULL_PROBE) if args.full_groups is None or i in args.full_groups]

    def run(state_dtype, ac, mb, fused):
        s = shape[:7] + (mb,)
        cfg_hf = hf_config("8x1.5b", s)

        def make():
            torch.manual_seed(0)
            model = build_model(ModelConfig.from_hf(cfg_hf), device=device)
            model.set_activation_checkpointing(ac)
            model.compile_layers()
            return model, dropup_step_fn(model, True)

        moments = str(state_dtype).removeprefix("torch.")
        label = (f"dropup (compiled), {moments} AdamW moments{'' if fused else ' (eager update)'}, "
                 f"checkpointing {ac}, micro-batch {mb}")
        r = run_contender(label, make, s, device, 3, 2, state_dtype, fused=fused)
        r["shape"] = "8x1.5b (24 layers)"
        print(json.dumps(r), flush=True)
        return r

    return probe_groups(groups, run)


def profile_step(sname, shape, device, out_dir, peers_too: tuple[str, ...] = ()) -> None:
    """Top kernels of two compiled training steps (after warm-up) of dropup and of each installed
    peer, printed and saved: where the time goes when one is faster than the other."""
    from torch.profiler import ProfilerActivity, profile

    def dropup_make():
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_hf(hf_config(sname, shape)), device=device)
        model.compile_layers()
        return model, dropup_step_fn(model, shape[0]), None

    makers = {"dropup": dropup_make}
    seq = SEQ if device.type == "cuda" else 64
    for dist, _, build in peers.installed(peers_too):
        makers[peers.label(dist)] = lambda build=build: build(shape, seq, device, True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # Self time: each kernel (and each op's own host work) once, not again in every parent op.
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for who, make in makers.items():
        model, step, pre = make()
        time_training(step, model, shape, device, 2, 2, pre_step=pre)
        with profile(activities=acts) as prof:
            time_training(step, model, shape, device, 2, 0, pre_step=pre)
        text = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=90)
        print(f"profile {who} {sname}\n{text}")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"profile_{who}_{sname}.txt").write_text(text)
        model = step = pre = None
        free()


def versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__, **peers.peer_versions(), **peers.extension_versions()}
    if torch.cuda.is_available():
        v["device"] = torch.cuda.get_device_name()
        v["cuda"] = torch.version.cuda
    return v


PEER_PREFIXES = tuple(peers.label(dist) for dist in peers.PEERS)  # the peers issue 16 measures dropup against


def best_of(rows: list[dict], prefixes: tuple[str, ...]) -> dict[str, float]:
    """Per shape, the highest tokens/s among the contenders whose label starts with a prefix."""
    best: dict[str, float] = {}
    for r in rows:
        if r["contender"].startswith(prefixes) and "error" not in r:
            best[r["shape"]] = max(best.get(r["shape"], 0.0), r["tokens_per_s"])
    return best


def table(rows: list[dict], ceiling: float) -> str:
    hf, peer = best_of(rows, ("transformers",)), best_of(rows, PEER_PREFIXES)
    head = ["shape", "contender", "tokens/s", "step s", "peak GiB", "model TFLOP/s", "of ceiling",
            "vs best transformers", "vs best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['contender']} | {r['error']} |" + " |" * (len(head) - 3))
            continue

        def vs(best):
            b = best.get(r["shape"])
            return f"{r['tokens_per_s'] / b:.2f}x" if b else "-"
        lines.append(f"| {r['shape']} | {r['contender']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
                     f"{r['peak_gib']:.1f} | {r['tflops']:.0f} | {r['tflops'] / ceiling:.1%} | {vs(hf)} | "
                     f"{vs(peer)} |")
    return "\n".join(lines)


# Issue 16's targets, per MoE shape: (its dense twin, the share of the ceiling to reach).
TARGETS = {"8x152m": ("152m", 0.45), "8x1.5b-4l": ("1.5b-4l", 0.62)}


def targets(rows: list[dict], ceiling: float) -> list[str]:
    """One line per issue-16 target that this run measured: the value, the target, met or not."""
    ours = {r["shape"]: r for r in rows if r["contender"] == "dropup (compiled)" and "error" not in r}
    peer = best_of(rows, PEER_PREFIXES)
    out = []

    def line(what, value, goal, fmt):
        out.append(f"- {what}: {fmt.format(value)} (target >= {fmt.format(goal)}): "
                   f"{'met' if value >= goal else 'MISSED'}")
    for moe, (dense, share) in TARGETS.items():
        if moe not in ours:
            continue
        r = ours[moe]
        if moe in peer:
            line(f"{moe} dropup / best peer tokens/s", r["tokens_per_s"] / peer[moe], 1.15, "{:.2f}x")
        line(f"{moe} share of the bf16 ceiling", r["tflops"] / ceiling, share, "{:.1%}")
        if dense in ours:
            line(f"{moe} MoE / dense model TFLOP/s (dropup)", r["tflops"] / ours[dense]["tflops"], 0.95,
                 "{:.2f}x")
    accum = {r["shape"]: r for r in rows if r.get("accum", 1) > 1 and "error" not in r}
    for moe, (dense, _) in TARGETS.items():
        if moe in accum and dense in accum:
            ratio = accum[moe]["tflops"] / accum[dense]["tflops"]
            out.append(f"- for information, not a target: {moe} MoE / dense model TFLOP/s with "
                       f"{accum[moe]['accum']} micro-batches per optimizer step: {ratio:.2f}x")
    full = [r for r in rows if r["shape"].startswith("8x1.5b (24") and "error" not in r]
    if full:
        best = max(full, key=lambda r: r["tflops"])
        line(f"full 24-layer 8x1.5B model TFLOP/s ({best['contender']})", best["tflops"], 420, "{:.0f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8x152m,152m,8x1.5b-4l,1.5b-4l", help="comma-separated; "
                    "'none' to run only --full-8x1.5b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-peers", action="store_true", help="skip torchtitan and OLMo-core")
    ap.add_argument("--peers", default=",".join(peers.label(d) for d in peers.PEERS),
                    help="comma-separated peers to run where installed (default: all)")
    ap.add_argument("--no-eager", action="store_true", help="skip dropup eager")
    ap.add_argument("--no-dropup", action="store_true", help="skip dropup's rows (the fast-path checks "
                    "still run): a peer's rows added to an earlier run on the same machine")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--accum", type=int, default=0, help="also time dropup with this many "
                    "micro-batches per optimizer step, as a run with a large global batch has them "
                    "(for information: issue 16's targets are measured at one per step)")
    ap.add_argument("--full-8x1.5b", action="store_true", dest="full")
    ap.add_argument("--full-groups", default=None, type=lambda v: {int(i) for i in v.split(",")},
                    help="with --full-8x1.5b: comma-separated indices into FULL_PROBE (default all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (tests the script)")
    ap.add_argument("--profile", action="store_true", help="profile the compiled step of each MoE shape "
                    "(dropup, and the peers unless --no-peers)")
    ap.add_argument("--check-only", action="store_true", help="run the fast-path checks, no timing")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.peers = tuple(args.peers.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shapes = SMOKE if args.smoke else SHAPES
    names = [s for s in args.shapes.split(",") if s in shapes]
    print(json.dumps(versions()), flush=True)
    ceiling = matmul_ceiling(device)
    print(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s", flush=True)
    checks = {}
    for sname in names:
        if shapes[sname][0]:
            checks[sname] = check_fast_path(shapes[sname], device, not args.no_compile)
            print(f"fast-path check {sname}: {checks[sname]}", flush=True)
    rows = []
    for sname in ([] if args.check_only else names):
        for r in bench_shape(sname, shapes[sname], device, args):
            print(json.dumps(r), flush=True)
            rows.append(r)
    if args.profile:
        for sname in names:
            if shapes[sname][0]:
                profile_step(sname, shapes[sname], device, args.out, () if args.no_peers else args.peers)
    if args.full and not args.smoke:
        rows.extend(full_8x15b_probe(device, args))
    text = [f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: train_bench",
            "", f"- command: `{shlex.join(['python', *sys.argv])}`",
            f"- versions: {json.dumps(versions())}",
            f"- bf16 matmul ceiling measured in this run: {ceiling:.0f} TFLOP/s",
            f"- sequence {SEQ if device.type == 'cuda' else 64}; steps timed {args.steps} after {args.warmup} warm-up; median",
            "- fast-path checks (grouped+compiled vs per-expert eager reference, both bf16 autocast; relative error, limit 1e-2; bf16_vs_fp32 for information): "
            + "; ".join(f"{k}: {json.dumps(v)}" for k, v in checks.items()), "",
            table(rows, ceiling), "", "Issue 16 targets measured in this run:", *targets(rows, ceiling),
            *largest_fitting(rows), ""]
    out = "\n".join(text)
    print(out)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_bench.md").write_text(out)
    (Path(args.out) / "train_bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
