"""`dropup upcycle`: build an MoE checkpoint from dense checkpoint(s) by one of the paper's methods.

Methods (Nakamura et al., "Drop-Upcycling", ICLR 2025, and the baselines it compares):
  drop     copy the dense FFN into every expert, then re-draw a fraction r of each expert's
           intermediate neurons from N(mean, std^2) of the original weights (Drop-Upcycling)
  naive    copy the dense FFN into every expert (Komatsuzaki et al., "Sparse Upcycling", 2023)
  noise    naive, then add N(0, noise_std^2) to a fraction r of the neurons (Random Noise Upcycling)
  scratch  the target architecture drawn from N(0, 0.02^2), norms at one (From Scratch)
  btx      one dense source per group of experts, non-FFN tensors averaged
           (Sukhbaatar et al., "Branch-Train-MiX", 2024)

Every output tensor is produced by a small function of (seed, layer, expert, matrix) and the
source weights, planned before anything is written, then computed by a pool of threads and
streamed to disk in plan order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from dropup.hub import names as archs
from dropup.convert import surgery
from dropup.hub.safetensors import (
    ALIGN,
    DTYPE_NAMES,
    DenseCheckpoint,
    ShardedWriter,
    TensorSpec,
    aligned_empty,
    placed,
    atomic_output_dir,
    check_free_space,
    parse_size,
)
from dropup.errors import UserError
from dropup.hub.config import config_json, dense_to_moe

METHODS = ("drop", "naive", "noise", "scratch", "btx")


@dataclass
class UpcycleOptions:
    method: str = "drop"
    ratio: float = 0.5
    num_experts: int = 8
    top_k: int = 2
    seed: int = 0
    index_sampling: str = "shared"  # shared | per-matrix
    reinit_stats: str = "slice"  # slice | matrix
    noise_std: float = 0.02
    router_init: str = "uniform"  # uniform | normal | zeros
    router_std: float = 0.02
    init_std: float = 0.02  # scratch
    sources: list[str] = field(default_factory=list)  # btx: sources besides SRC
    target: str = "auto"
    aux_loss_coef: float = 0.02
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    verify: bool = False
    threads: int = 0  # 0: one per core, at most 8
    progress: bool = True

    @property
    def copies_experts(self) -> bool:
        """Every expert is a plain copy of a dense FFN: naive, btx, or drop / noise at r = 0."""
        return self.method in ("naive", "btx") or (
            self.method in ("drop", "noise") and self.ratio == 0.0)

    def validate(self) -> None:
        def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise UserError(f"--{name} {value!r} is not one of: {', '.join(allowed)}")

        choice("method", self.method, METHODS)
        choice("index-sampling", self.index_sampling, ("shared", "per-matrix"))
        choice("reinit-stats", self.reinit_stats, ("slice", "matrix"))
        choice("router-init", self.router_init, ("uniform", "normal", "zeros"))
        choice("dtype", self.dtype, ("auto", *DTYPE_NAMES))
        choice("target", self.target, ("auto", *archs.TARGET_TYPES))
        if not 0.0 <= self.ratio <= 1.0:
            raise UserError(f"--ratio {self.ratio} is outside [0, 1]; 0.5 is the paper's choice")
        if self.num_experts < 2:
            raise UserError(f"--num-experts {self.num_experts}: an MoE needs at least 2 experts")
        if not 1 <= self.top_k <= self.num_experts:
            raise UserError(f"--top-k {self.top_k} is outside [1, num_experts={self.num_experts}]")
        for name in ("noise_std", "router_std", "init_std"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative")
        if self.sources and self.method != "btx":
            raise UserError("--sources is only used with --method btx")
        parse_size(self.max_shard_size)


class _BufferPool:
    """Output tensors handed back once written, so the next expert reuses their memory.

    Gigabytes of expert weights stream through a handful of buffers; allocating each one fresh
    costs a page fault per 4 KiB and fragments the allocator (more system time and RSS than the
    arithmetic itself). Each buffer is placed at the address phase (modulo ``ALIGN``) of its
    tensor's file offset, which is what lets the writer send it to disk with direct I/O.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = {}
        self._raw: dict[int, torch.Tensor] = {}  # data_ptr of a handed-out view -> its storage

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, phase: int = 0) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            free = self._free.get(nbytes)
            raw = free.pop() if free else torch.empty(nbytes + ALIGN, dtype=torch.uint8)
            view = placed(raw, shape, dtype, phase)
            self._raw[view.data_ptr()] = raw
            return view

    def give(self, t: torch.Tensor) -> None:
        with self._lock:
            raw = self._raw.pop(t.data_ptr(), None)
            if raw is not None:
                self._free.setdefault(raw.numel() - ALIGN, []).append(raw)


@dataclass
class _Ctx:
    """Everything a tensor producer needs, shared read-only by the worker threads."""

    opts: UpcycleOptions
    shape: archs.DenseShape
    target: str
    out_dtype: torch.dtype
    sources: list[DenseCheckpoint]
    record: dict  # provenance, filled by producers
    buffers: _BufferPool = field(default_factory=_BufferPool)
    phase: dict[str, int] = field(default_factory=dict)  # the writer's, set once it exists
    _local: threading.local = field(default_factory=threading.local)

    def scratch(self) -> surgery.Scratch:
        if not hasattr(self._local, "scratch"):
            self._local.scratch = surgery.Scratch()
        return self._local.scratch

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A pooled output buffer for tensor ``name``, placed for direct I/O."""
        return self.buffers.take(tuple(shape), self.out_dtype, self.phase.get(name, 0))

    def cast(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """Expert ``name`` copied from ``t``: ``t`` itself when its dtype and placement already
        suit the writer, else a pooled copy (a memcpy here costs less than a buffered write)."""
        if t.dtype == self.out_dtype and (t.data_ptr() - self.phase.get(name, 0)) % ALIGN == 0:
            return t
        return self.take(name, tuple(t.shape)).copy_(t)


class _FFNCache:
    """Dense FFN matrices of the layers being worked on, loaded once however many experts use them.

    Producers run in plan order with a small look-ahead, so when a layer is first asked for, the
    older layers' entries (and their locks) are dropped to keep memory bounded.
    """

    def __init__(self, sources: list[DenseCheckpoint], shape: archs.DenseShape, checksums: dict,
                 page_aligned: bool = False):
        self.sources, self.shape, self.checksums = sources, shape, checksums
        # Experts that are plain copies (naive, btx) are written straight from these tensors,
        # which direct I/O can do only from page-aligned memory.
        self.page_aligned = page_aligned
        self._lock = threading.Lock()
        self._loaded: dict[tuple, object] = {}
        self._locks: dict[tuple, threading.Lock] = {}

    def get(self, source: int, layer: int, matrix: str) -> torch.Tensor:
        return self._once((source, layer, matrix), lambda: self._read(source, layer, matrix))

    def moments(self, source: int, layer: int, matrix: str) -> surgery.NeuronMoments:
        return self._once((source, layer, matrix, "moments"), lambda: surgery.neuron_moments(
            self.get(source, layer, matrix), matrix))

    def _read(self, source: int, layer: int, matrix: str) -> torch.Tensor:
        ck, name = self.sources[source], self.shape.ffn_name(layer, matrix)
        tensor = ck.get(name)
        self.checksums[(str(ck.path), name)] = _checksum(tensor)
        if self.page_aligned:
            tensor = aligned_empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)
        return tensor

    def _once(self, key: tuple, make: Callable):
        layer = key[1]
        with self._lock:
            # A producer of an older layer still running holds its own reference; one that
            # starts late re-reads the tensor (same bytes), so dropping them here is safe.
            for k in [k for k in self._locks if k[1] < layer]:
                self._loaded.pop(k, None)
                del self._locks[k]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._loaded:
                self._loaded[key] = make()
            return self._loaded[key]


def _check_source(ck: DenseCheckpoint, shape: archs.DenseShape, need_ffn: bool) -> None:
    expected = shape.all_tensors() if need_ffn else shape.non_ffn_tensors()
    for name, want in expected.items():
        info = ck.tensors.get(name)
        if info is None:
            raise UserError(f"{ck.what} {ck.path}: tensor {name} is missing; the checkpoint does not "
                            "match its config.json")
        if info.shape != want:
            raise UserError(f"{ck.what} {ck.path}: tensor {name} has shape {list(info.shape)}, "
                            f"config.json implies {list(want)}")
        if not info.dtype.is_floating_point:
            raise UserError(f"{ck.what} {ck.path}: tensor {name} is {info.dtype}, not floating point")
    tied_head = shape.tied and "lm_head.weight" in ck.tensors
    extra = sorted(set(ck.tensors) - set(expected) - ({"lm_head.weight"} if tied_head else set()))
    if need_ffn and extra:
        print(f"dropup: warning: {len(extra)} tensor(s) of {ck.path} are not part of a "
              f"{shape.model_type} model and are not copied (first: {extra[0]})", file=sys.stderr)


def _index_sets(ctx: _Ctx, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The neurons each FFN matrix of one expert re-initialises (drop) or perturbs (noise)."""
    o, d_f = ctx.opts, ctx.shape.d_f
    if o.index_sampling == "shared":
        idx = surgery.sample_indices(d_f, o.ratio, surgery.generator(o.seed, "indices", layer, expert))
        return {m: idx for m in surgery.FFN_MATRICES}
    return {m: surgery.sample_indices(d_f, o.ratio, surgery.generator(o.seed, "indices", layer, expert, m))
            for m in surgery.FFN_MATRICES}


def _expert_producer(ctx: _Ctx, cache: _FFNCache, layer: int, expert: int, matrix: str) -> Callable:
    o = ctx.opts
    name = archs.expert_name(ctx.target, layer, expert, matrix)

    def produce() -> torch.Tensor:
        if o.method == "scratch":
            shape = ctx.shape.ffn_shape(matrix)
            key = surgery.derive_seed(o.seed, "scratch", layer, expert, matrix)
            return surgery.scratch_weight(shape, o.init_std, key, ctx.out_dtype)
        if o.method == "btx":
            src = surgery.btx_source_of_expert(expert, o.num_experts, len(ctx.sources))
            return ctx.cast(cache.get(src, layer, matrix), name)
        dense = cache.get(0, layer, matrix)
        if o.copies_experts:
            return ctx.cast(dense, name)
        idx = _index_sets(ctx, layer, expert)[matrix]
        key = surgery.derive_seed(o.seed, "values", layer, expert, matrix)
        out = ctx.take(name, tuple(dense.shape))
        entry = {"reinit_fraction": idx.numel() / ctx.shape.d_f}
        if o.method == "drop":
            moments = cache.moments(0, layer, matrix)
            stats = surgery.stats_from_moments(moments, idx if o.reinit_stats == "slice" else None)
            surgery.drop_reinit(dense, matrix, idx, stats, key, out=out, scratch=ctx.scratch())
            entry.update(mean=stats.mean, std=stats.std)
        else:  # noise
            surgery.add_noise(dense, matrix, idx, o.noise_std, key, out=out, scratch=ctx.scratch())
            entry.update(noise_std=o.noise_std)
        ctx.record["experts"][(layer, expert)][matrix] = entry
        return out

    return produce


def _copy_producer(ctx: _Ctx, name: str, shape: tuple[int, ...], checksums: dict) -> Callable:
    def produce() -> torch.Tensor:
        if ctx.opts.method == "scratch":
            if name.endswith("norm.weight"):
                return torch.ones(shape, dtype=ctx.out_dtype)
            if name.endswith(".bias"):
                return torch.zeros(shape, dtype=ctx.out_dtype)
            key = surgery.derive_seed(ctx.opts.seed, "scratch", name)
            return surgery.scratch_weight(shape, ctx.opts.init_std, key, ctx.out_dtype)
        tensors = [s.get(name) for s in ctx.sources]
        for s, t in zip(ctx.sources, tensors):
            checksums[(str(s.path), name)] = _checksum(t)
        # Written as they come (buffered when misaligned): a page-aligned copy of an embedding
        # would double its memory for a gain of well under a second.
        if len(tensors) == 1:
            return tensors[0].to(ctx.out_dtype)
        return surgery.mean_of(tensors).to(ctx.out_dtype)

    return produce


def _checksum(t: torch.Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()[:16]


def _plan(ctx: _Ctx, cache: _FFNCache, checksums: dict) -> list[tuple[TensorSpec, Callable]]:
    shape, target, o, dt = ctx.shape, ctx.target, ctx.opts, ctx.out_dtype
    non_ffn = shape.non_ffn_tensors()
    plan: list[tuple[TensorSpec, Callable]] = []

    def add(name: str, shp: tuple[int, ...], fn: Callable) -> None:
        plan.append((TensorSpec(dt, tuple(shp), name=name), fn))

    def const(shp: tuple[int, ...], value: float) -> Callable:
        return lambda: torch.full(shp, value, dtype=dt)

    layer_prefix = "model.layers."
    for name, shp in non_ffn.items():
        if name.startswith(layer_prefix):
            continue
        if name == "model.norm.weight" or name == "lm_head.weight":
            continue
        add(name, shp, _copy_producer(ctx, name, shp, checksums))
    for layer in range(shape.layers):
        prefix = f"{layer_prefix}{layer}."
        for name, shp in non_ffn.items():
            if name.startswith(prefix):
                add(name, shp, _copy_producer(ctx, name, shp, checksums))
        if archs.adds_qk_norm(shape, target):
            for name in archs.qk_norm_names(layer):
                add(name, (shape.head_dim,), const((shape.head_dim,), 1.0))
        router_key = surgery.derive_seed(o.seed, "router", layer)
        add(archs.router_name(target, layer), (o.num_experts, shape.hidden),
            lambda k=router_key: surgery.router_weight(
                o.num_experts, shape.hidden, o.router_init, o.router_std, k).to(dt))
        for expert in range(o.num_experts):
            for m in surgery.FFN_MATRICES:
                add(archs.expert_name(target, layer, expert, m), shape.ffn_shape(m),
                    _expert_producer(ctx, cache, layer, expert, m))
        shared = archs.shared_expert_names(target, layer)
        if shared:
            _add_shared_expert(ctx, cache, layer, shared, add)
    for name in ("model.norm.weight", "lm_head.weight"):
        if name in non_ffn:
            add(name, non_ffn[name], _copy_producer(ctx, name, non_ffn[name], checksums))
    return plan


def _add_shared_expert(ctx: _Ctx, cache: _FFNCache, layer: int, names: dict, add: Callable) -> None:
    """Qwen2-MoE's shared expert: gate and up start as the dense FFN's, down starts at zero.

    The shared expert's output is sigmoid(gate(x)) * down(...); a zero down projection makes its
    contribution exactly zero at step 0 (so naive upcycling stays function-preserving), while
    down still receives gradients from the first step on, and through it gate and up.
    """
    o, shape, dt = ctx.opts, ctx.shape, ctx.out_dtype
    for m in ("gate", "up"):
        if o.method == "scratch":
            key = surgery.derive_seed(o.seed, "scratch", layer, "shared", m)
            fn = (lambda s=shape.ffn_shape(m), k=key: surgery.scratch_weight(s, o.init_std, k, dt))
        else:
            fn = (lambda m=m: surgery.mean_of(
                [cache.get(i, layer, m) for i in range(len(ctx.sources))]).to(dt))
        add(names[m], shape.ffn_shape(m), fn)
    add(names["down"], shape.ffn_shape("down"), lambda: torch.zeros(shape.ffn_shape("down"), dtype=dt))
    add(names["shared_gate"], (1, shape.hidden), lambda: torch.zeros((1, shape.hidden), dtype=dt))


def _intact_fractions(ctx: _Ctx) -> None:
    """Per expert, the fraction of neurons untouched in all three matrices."""
    o, d_f = ctx.opts, ctx.shape.d_f
    for (layer, expert), entry in ctx.record["experts"].items():
        if o.method in ("drop", "noise") and o.ratio > 0:
            sets = _index_sets(ctx, layer, expert)
            touched = torch.zeros(d_f, dtype=torch.bool)
            for idx in sets.values():
                touched[idx] = True
            entry["intact_fraction"] = 1.0 - touched.sum().item() / d_f
        elif o.method == "scratch":
            entry["intact_fraction"] = 0.0
        else:
            entry["intact_fraction"] = 1.0


def _resolve_dtype(opts: UpcycleOptions, src: DenseCheckpoint) -> torch.dtype:
    if opts.dtype != "auto":
        return DTYPE_NAMES[opts.dtype]
    dtype = src.tensors["model.embed_tokens.weight"].dtype
    return dtype if dtype in DTYPE_NAMES.values() else torch.float32


def _progress(enabled: bool):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    return Progress(TextColumn("[bold]upcycle"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=True)


def upcycle(src: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Convert the dense checkpoint ``src`` into an MoE checkpoint at ``out``.

    Options are the fields of :class:`UpcycleOptions` (the CLI flags with ``-`` as ``_``).
    Returns the provenance record that is also written to ``out/upcycling.json``.
    Raises :class:`dropup.UserError` for bad input, leaving ``out`` untouched.
    """
    unknown = set(options) - set(UpcycleOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown upcycle option(s): {', '.join(sorted(unknown))}")
    opts = UpcycleOptions(**options)
    opts.sources = [str(s) for s in opts.sources]
    opts.validate()
    t0 = time.perf_counter()
    out = Path(out)
    main = DenseCheckpoint(src, "SRC")
    shape = archs.dense_shape(main.config, f"SRC {main.path}")
    target = archs.resolve_target(shape, opts.target)
    sources = [main]
    if opts.method == "btx":
        if not opts.sources:
            raise UserError("--method btx needs --sources SRC2 [SRC3 ...]: the dense models "
                            "trained further from SRC")
        for s in opts.sources:
            ck = DenseCheckpoint(s, "btx source")
            other = archs.dense_shape(ck.config, f"btx source {ck.path}")
            if other != shape:
                raise UserError(f"btx source {ck.path} has a different shape from SRC "
                                f"({_shape_diff(shape, other)}); all sources must share one shape")
            sources.append(ck)
    for ck in sources:
        _check_source(ck, shape, need_ffn=opts.method != "scratch")
    out_dtype = _resolve_dtype(opts, main)
    dtype_name = {v: k for k, v in DTYPE_NAMES.items()}[out_dtype]
    moe = dense_to_moe(shape.config, target, num_experts=opts.num_experts, top_k=opts.top_k,
                       aux_loss_coef=opts.aux_loss_coef)
    # The installed version, read from package metadata: importing transformers costs a second.
    config = moe.to_hf(dtype=dtype_name, transformers_version=version("transformers"))
    record: dict = {"experts": {(layer, e): {} for layer in range(shape.layers)
                                for e in range(opts.num_experts)}}
    ctx = _Ctx(opts, shape, target, out_dtype, sources, record)
    checksums: dict = {}
    cache = _FFNCache(sources, shape, checksums, page_aligned=opts.copies_experts)
    plan = _plan(ctx, cache, checksums)
    total = sum(spec.nbytes for spec, _ in plan)
    with atomic_output_dir(out, opts.overwrite) as tmp:
        check_free_space(out, total + (64 << 20))
        writer = ShardedWriter(tmp, [spec for spec, _ in plan], parse_size(opts.max_shard_size))
        ctx.phase = writer.phase
        try:
            _run_plan(plan, writer, opts, ctx.buffers)
            writer.close()
        finally:
            writer.abort()
        (tmp / "config.json").write_text(config_json(config))
        side = main.copy_side_files(tmp)
        _intact_fractions(ctx)
        provenance = _provenance(opts, main, sources, shape, target, out_dtype, record, checksums,
                                 side, total, time.perf_counter() - t0)
        (tmp / "upcycling.json").write_text(json.dumps(provenance, indent=1) + "\n")
        if opts.verify:
            from dropup.convert.verify import verify

            provenance["verify"] = verify(main.path, tmp, provenance)
            (tmp / "upcycling.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return provenance


def _run_plan(plan: list[tuple[TensorSpec, Callable]], writer: ShardedWriter, opts: UpcycleOptions,
              buffers: _BufferPool) -> None:
    """Compute tensors on a thread pool with bounded look-ahead; write them in plan order.

    torch kernels and file writes release the GIL, so drawing random numbers for one expert
    overlaps with writing the previous one. The look-ahead bounds memory to a few tensors.
    """
    threads = opts.threads or max(1, min(8, os.cpu_count() or 1))
    window = 2 * threads
    with _progress(opts.progress and sys.stderr.isatty()) as bar, \
            ThreadPoolExecutor(threads, thread_name_prefix="dropup-upcycle") as pool:
        task = bar.add_task("upcycle", total=writer.total_bytes)
        pending: deque = deque()
        it = iter(plan)
        for spec, fn in it:
            pending.append((spec, pool.submit(fn)))
            if len(pending) >= window:
                break
        while pending:
            spec, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(nxt[1])))
            tensor = fut.result()
            writer.write(spec.name, tensor)
            buffers.give(tensor)
            bar.advance(task, spec.nbytes)


def _shape_diff(a: archs.DenseShape, b: archs.DenseShape) -> str:
    da, db = asdict(a), asdict(b)
    return ", ".join(f"{k} {da[k]} vs {db[k]}" for k in da if da[k] != db[k])


def _provenance(opts, main, sources, shape, target, out_dtype, record, checksums, side, total, seconds):
    from dropup._version import __version__

    def entry(rec: dict) -> dict:
        # Producers run on a thread pool and fill rec in completion order: write a fixed order.
        return {k: rec[k] for k in (*surgery.FFN_MATRICES, "intact_fraction") if k in rec}

    per_layer = [[{"expert": e, **entry(record["experts"][(layer, e)])} for e in range(opts.num_experts)]
                 for layer in range(shape.layers)]
    intact = [x["intact_fraction"] for layer in per_layer for x in layer]
    by_source: dict[str, dict[str, str]] = {}
    for (path, name), digest in sorted(checksums.items()):
        by_source.setdefault(path, {})[name] = digest
    return {
        "dropup_version": __version__,
        "method": opts.method,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("progress", "threads")},
        "seed": opts.seed,
        "target": target,
        "function_preserving_target": archs.function_preserving_target(shape, target),
        "dtype": str(out_dtype).removeprefix("torch."),
        "source": {
            "path": str(main.path.resolve()),
            "config": main.config,
            "tensor_sha256_16": by_source.get(str(main.path), {}),
        },
        "btx_sources": [{"path": str(s.path.resolve()), "config": s.config,
                         "tensor_sha256_16": by_source.get(str(s.path), {})} for s in sources[1:]],
        "side_files": side,
        "output_bytes": total,
        "seconds": round(seconds, 3),
        "mean_intact_fraction": sum(intact) / len(intact),
        "layers": per_layer,
    }
