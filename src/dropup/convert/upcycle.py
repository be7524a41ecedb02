"""`dropup upcycle`: build an MoE checkpoint from dense checkpoint(s) by one of the paper's methods.

The methods (Drop-Upcycling, naive, random-noise, from scratch, Branch-Train-MiX) are entries of
``methods.METHODS``; this module is what they share. Every output tensor is produced by a small
function of (seed, layer, expert, matrix) and the source weights, planned before anything is
written, then computed by a pool of threads and streamed to disk in plan order.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import torch

from dropup.convert import ratios, surgery
from dropup.options import check_choices, check_ranges, ranged
from dropup.convert.methods import (METHODS, Method, MethodName, intact_fraction, non_ffn_tensor,
                                    routed_group, shared_expert_matrix)
from dropup.errors import UserError
from dropup.hub import names as archs
from dropup.hub.atomic import atomic_dir
from dropup.hub.card import model_name, parameter_counts, upcycling_info, write_model_card
from dropup.hub.config import config_json, dense_to_moe, expand_moe, parse_moe_layers
from dropup.hub.gguf import dense_source
from dropup.hub.gguf import origin as gguf_origin
from dropup.hub.safetensors import (
    DTYPE_NAMES,
    ROUTER_BIAS_FILE,
    CheckpointReader,
    ShardedWriter,
    TensorSpec,
    check_free_space,
    parse_size,
    read_router_bias_file,
    write_router_bias_file,
)


_STD = "a standard deviation; default 0.02"
# Field metadata. "only": the one method that uses the option (another method with a value other
# than the default is refused). "recorded": "when-set": see recorded_options.
_GENTLER = {"only": "drop", "recorded": "when-set"}
_WHEN_SET = {"recorded": "when-set"}
DENSE_TOP_K = 2  # --top-k's default for a dense SRC: the paper routes each token to 2


@dataclass
class UpcycleOptions:
    method: MethodName = "drop"
    # one r for every layer, one per layer, or linear:A:B over depth (``ratios``); each in [0, 1]
    ratio: ratios.Ratio = ranged(0.5, ge=0, le=1, hint="0.5 is the paper's choice")
    num_experts: int = ranged(8, ge=2, integer=True, hint="an MoE needs at least 2 experts")
    # None: DENSE_TOP_K for a dense SRC; SRC's k times E / E_src when expanding an MoE (_resolve_top_k)
    top_k: int | None = ranged(None, ge=1, le="num_experts", integer=True, hint="the paper routes each token to 2")
    seed: int = ranged(0, ge=0, le=2**63 - 1, integer=True)
    # shared: one neuron set per expert for gate, up and down; per-matrix: one set per matrix
    index_sampling: Literal["shared", "per-matrix"] = "shared"
    reinit_stats: Literal["slice", "matrix"] = "slice"  # moments of the replaced slice or whole matrix
    # The re-drawn values' std is the statistic's times this (1: the paper).
    reinit_scale: float = ranged(1.0, gt=0, metadata=_GENTLER,
                                 hint="1 draws with the dense weights' own std, the paper's choice")
    # The re-drawn neurons' columns of down drawn like gate and up (the paper), or zero, so that
    # those neurons start silent and the kept ones carry the function.
    reinit_down: Literal["drawn", "zeros"] = field(default="drawn", metadata=_GENTLER)
    noise_std: float = ranged(0.02, ge=0, hint=_STD)
    router_init: Literal["uniform", "normal", "zeros"] = "uniform"
    router_std: float = ranged(0.02, ge=0, hint=_STD)
    init_std: float = ranged(0.02, ge=0, hint=_STD)  # scratch
    sources: list[str] = field(default_factory=list)  # btx: sources besides SRC
    target: Literal["auto", *archs.TARGET_TYPES] = "auto"
    moe_layers: str | None = None  # "1,3" (or [1, 3]) or "every:N": only these become MoE (Qwen-MoE targets)
    # Fine-grained experts: each dense FFN cut into G shards of d_f / G neurons (see _plan).
    granularity: int = ranged(1, ge=1, integer=True, metadata=_WHEN_SET,
                              hint="1 keeps whole-width experts; G must divide the dense d_f")
    # How Qwen2-MoE's always-on shared expert starts (see shared_expert_matrix) and its width
    # (0: the start's own, d_f or d_f / G).
    shared_expert: Literal["silent", "dense", "shard"] = field(default="silent", metadata=_WHEN_SET)
    shared_expert_size: int = ranged(0, ge=0, integer=True, metadata=_WHEN_SET,
                                     hint="0: d_f for silent and dense, d_f / G for shard")
    aux_loss_coef: float = ranged(0.02, ge=0, hint="the load-balancing coefficient; 0 turns the loss off")
    dtype: Literal["auto", *DTYPE_NAMES] = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    verify: bool = False
    verify_text: str | None = None  # tokenised by SRC's tokenizer; implies verify
    threads: int = ranged(0, ge=0, integer=True, hint="0: one thread per core, at most 8")
    progress: bool = True

    def validate(self) -> None:
        check_choices(self)
        self.ratio = ratios.parse(self.ratio, check_ratio)
        check_ranges(self, skip=("ratio",))
        for f in dataclasses.fields(self):  # numpy scalars pass the checks; upcycling.json needs plain numbers
            value = getattr(self, f.name)
            if "range" in f.metadata and f.name != "ratio" and value is not None and type(value) not in (int, float):
                setattr(self, f.name, int(value) if f.metadata["range"].integer else float(value))
        method = METHODS[self.method]
        if ratios.is_per_layer(self.ratio) and not method.uses_ratio:
            raise UserError(f"--ratio {ratios.text(self.ratio)} sets r per layer, but --method {self.method} "
                            "does not use --ratio (" + " and ".join(n for n, m in METHODS.items() if m.uses_ratio)
                            + " do); pass one value or leave --ratio out")
        for f in dataclasses.fields(self):
            only = f.metadata.get("only")
            if only and only != self.method and getattr(self, f.name) != f.default:
                raise UserError(f"--{f.name.replace('_', '-')} changes how {only} re-draws neurons; --method "
                                f"{self.method} does not use it (leave it out or use --method {only})")
        takes_sources = method.sources
        if self.sources and not takes_sources:
            raise UserError("--sources is only used with --method "
                            + " or ".join(n for n, m in METHODS.items() if m.sources))
        if takes_sources and not self.sources:
            raise UserError(f"--method {self.method} needs --sources SRC2 [SRC3 ...]: the dense "
                            "models trained further from SRC")
        _check_shard_size(self.max_shard_size)
        if isinstance(self.moe_layers, list | tuple):  # the Python API may list the indices
            self.moe_layers = ",".join(map(str, self.moe_layers))
        if self.moe_layers is not None:
            parse_moe_layers(self.moe_layers)  # the syntax now; the range once SRC's depth is known
        self._check_granularity()
        if self.verify_text is not None:
            self.verify = True

    def _check_granularity(self) -> None:
        """What --granularity and --shared-expert need of E and k (d_f and the target: _check_layout)."""
        G = self.granularity
        if self.shared_expert == "shard" and G < 2:
            raise UserError("--shared-expert shard gives the shared expert one of G shards of the dense "
                            "FFN; it needs --granularity G >= 2")
        g = routed_group(self)
        what = f"--granularity {G}" + (" with --shared-expert shard (G - 1 routed shards per copy)"
                                       if self.shared_expert == "shard" else "")
        top_k = DENSE_TOP_K if self.top_k is None else self.top_k  # G > 1 is for dense sources only
        for flag, value in (("--num-experts", self.num_experts), ("--top-k", top_k)):
            if value % g:
                raise UserError(f"{flag} {value} must be a multiple of {g} for {what}: each copy of the "
                                f"dense FFN is {g} experts, routed together")
        if g > 1 and self.router_init == "zeros":
            raise UserError(f"--router-init zeros with {what} ties every virtual group, so top-k would pick "
                            "shards of different copies by index; use uniform or normal")


def shared_expert_width(opts: UpcycleOptions, d_f: int) -> int:
    """--shared-expert-size, or the start's own width: d_f (silent, dense), d_f / G (shard)."""
    if opts.shared_expert_size:
        return opts.shared_expert_size
    return d_f // opts.granularity if opts.shared_expert == "shard" else d_f


def _check_layout(opts: UpcycleOptions, shape: archs.DenseShape, target: str) -> None:
    """What --granularity and the shared-expert options need of SRC's d_f and of the target."""
    G, d_f = opts.granularity, shape.d_f
    if G > 1 and target not in archs.GRANULAR_TARGETS:
        raise UserError(f"--granularity: {target}'s config.json cannot state an expert width narrower "
                        f"than the dense FFN; use --target {' or '.join(archs.GRANULAR_TARGETS)}")
    if d_f % G:
        raise UserError(f"--granularity {G} must divide SRC's intermediate_size {d_f} (each expert is "
                        f"d_f / G neurons); choose a divisor of {d_f}")
    shared_set = opts.shared_expert != "silent" or opts.shared_expert_size
    if shared_set and not archs.shared_expert_names(target, 0):
        raise UserError(f"--shared-expert and --shared-expert-size: {target} has no shared expert "
                        "(only qwen2_moe has one); leave them out")
    if opts.shared_expert != "silent" and METHODS[opts.method].non_ffn == "init":
        raise UserError(f"--shared-expert {opts.shared_expert} starts the shared expert from the dense FFN; "
                        f"--method {opts.method} inherits nothing from it (use --shared-expert silent)")
    own = d_f // G if opts.shared_expert == "shard" else d_f
    width = opts.shared_expert_size
    if opts.shared_expert == "silent" and width > d_f:
        raise UserError(f"--shared-expert-size {width}: a silent shared expert takes gate and up from the "
                        f"dense FFN's first neurons, so at most d_f = {d_f}")
    if opts.shared_expert != "silent" and width not in (0, own):
        raise UserError(f"--shared-expert-size {width}: --shared-expert {opts.shared_expert} is "
                        f"{'the dense FFN' if own == d_f else 'one shard'}, {own} neurons wide; leave it "
                        "out or use --shared-expert silent")


# Options that decide what a dense SRC's FFN becomes. An MoE SRC has its experts' width, its MoE
# layers, its shared expert and its routers already, and expansion keeps them (a child's router
# row is its parent's), so these are refused there.
_NOT_FOR_EXPANSION = ("granularity", "shared_expert", "shared_expert_size", "moe_layers", "router_init",
                      "router_std")


def _check_expansion(opts: UpcycleOptions, shape: archs.MoEShape) -> None:
    """What expanding an MoE SRC (``shape``) needs of the options."""
    E, what = shape.experts, f"SRC is a {shape.model_type} MoE with {shape.experts} experts"
    inherit = [n for n, m in METHODS.items() if m.non_ffn == "copy"]
    if opts.method not in inherit:
        raise UserError(f"--method {opts.method}: {what}; expanding it starts every new expert from one of "
                        f"them, which only {', '.join(inherit)} do")
    if opts.num_experts % E or opts.num_experts == E:
        raise UserError(f"--num-experts {opts.num_experts}: {what}; expansion gives each of them the same "
                        f"number of children, so --num-experts must be a multiple of {E} above it "
                        f"(e.g. --num-experts {2 * E})")
    for f in dataclasses.fields(opts):
        if f.name in _NOT_FOR_EXPANSION and getattr(opts, f.name) != f.default:
            flag = "--" + f.name.replace("_", "-")
            raise UserError(f"{flag}: {what}, whose expert width, MoE layers, shared expert and routers "
                            f"expansion keeps (each child's router row is its parent's); leave {flag} out")


def _resolve_top_k(opts: UpcycleOptions, shape: archs.DenseShape) -> int:
    """--top-k, or its default: DENSE_TOP_K, or when expanding an MoE of top-k its k times the
    expansion factor, which keeps SRC's function (docs/expand.md)."""
    if opts.top_k is not None:
        return opts.top_k
    if isinstance(shape, archs.MoEShape):
        return shape.top_k * (opts.num_experts // shape.experts)
    return DENSE_TOP_K


def recorded_options(opts: UpcycleOptions) -> dict:
    """The options as ``upcycling.json`` records them. Options added after its layout was fixed
    (``recorded: when-set``) appear only when they differ from their default: an absent key means
    the default, as in the records written before they existed, so a conversion that does not use
    them writes the same bytes as before."""
    unset = {f.name for f in dataclasses.fields(opts)
             if f.metadata.get("recorded") == "when-set" and getattr(opts, f.name) == f.default}
    return {k: v for k, v in asdict(opts).items() if k not in ("progress", "threads", *unset)}


def check_ratio(label: str, value) -> None:
    """One value of a --ratio spec against the ratio field's range (also for specs read back)."""
    UpcycleOptions.__dataclass_fields__["ratio"].metadata["range"].check(label, value)


def _check_shard_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, str | int):
        raise UserError(f"--max-shard-size {size!r} is not a size; write e.g. 5GB or 500MB")
    try:
        value = parse_size(size)
    except OverflowError:  # 'inf', '1e999GB'
        raise UserError(f"--max-shard-size {size!r} is not a size; write e.g. 5GB or 500MB") from None
    if value <= 0:
        raise UserError(f"--max-shard-size {size!r} must be positive")


@dataclass
class Context:
    """Everything a tensor producer needs, shared by the worker threads."""

    opts: UpcycleOptions
    method: Method
    shape: archs.DenseShape
    target: str
    out_dtype: torch.dtype
    sources: list[CheckpointReader]
    ratios: tuple[float, ...]  # r of each layer (``ratios.per_layer``)
    moe_layers: list[int] | None = None  # the layers that become MoE (None: all); the others stay dense
    experts: dict[tuple[int, int], dict] = field(default_factory=dict)  # provenance per expert
    checksums: dict[tuple[str, str], str] = field(default_factory=dict)  # (source, tensor) -> sha
    writer: ShardedWriter | None = None  # set once the plan is known
    cache: _FFNCache = field(init=False)
    _local: threading.local = field(default_factory=threading.local)

    def __post_init__(self) -> None:
        if self.moe_layers is None:
            self.moe_layers = list(range(self.shape.layers))
        self.experts = {(layer, e): {} for layer in self.moe_layers for e in range(self.opts.num_experts)}
        self.cache = _FFNCache(self)

    @property
    def factor(self) -> int:
        """Expert expansion of an MoE SRC: children m = E / E_src of each of its experts; 0 for a
        dense SRC."""
        return self.opts.num_experts // self.shape.experts if isinstance(self.shape, archs.MoEShape) else 0

    def parent(self, expert: int) -> int:
        """The SRC expert a child starts from: floor(e / m), so each parent's children are contiguous."""
        return expert // self.factor

    @property
    def expert_width(self) -> int:
        """Intermediate neurons per routed expert: d_f / G (an expanded MoE's: SRC's experts')."""
        return self.shape.expert_d_f if self.factor else self.shape.d_f // self.opts.granularity

    def expert_shape(self, matrix: str) -> tuple[int, int]:
        return archs.ffn_matrix_shape(matrix, self.expert_width, self.shape.hidden)

    @property
    def shared_width(self) -> int:
        """Intermediate neurons of Qwen2-MoE's shared expert (``shared_expert_width``)."""
        return shared_expert_width(self.opts, self.shape.d_f)

    def shared_shape(self, matrix: str) -> tuple[int, int]:
        return archs.ffn_matrix_shape(matrix, self.shared_width, self.shape.hidden)

    def read(self, source: int, name: str) -> torch.Tensor:
        """Tensor ``name`` of source ``source``; its checksum goes into the provenance."""
        ck = self.sources[source]
        tensor = ck.get(name)
        self.checksums[(str(ck.path), name)] = _checksum(tensor)
        return tensor

    def scratch(self) -> surgery.Scratch:
        if not hasattr(self._local, "scratch"):
            self._local.scratch = surgery.Scratch()
        return self._local.scratch


class _FFNCache:
    """Dense FFN matrices of the layers being worked on, loaded once however many experts use them.

    Producers run in plan order with a small look-ahead, so when a layer is first asked for, the
    older layers' entries (and their locks) are dropped to keep memory bounded.
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._lock = threading.Lock()
        self._loaded: dict[tuple, object] = {}
        self._locks: dict[tuple, threading.Lock] = {}

    def get(self, source: int, layer: int, matrix: str) -> torch.Tensor:
        return self._once((source, layer, matrix), lambda: self._read(source, layer, matrix))

    def shard(self, source: int, layer: int, matrix: str, shard: int) -> torch.Tensor:
        """Shard ``shard`` of the dense matrix as a fine-grained expert starts from it (down scaled)."""
        return self._once((source, layer, matrix, "shard", shard), lambda: self._shard(source, layer, matrix, shard))

    def expert(self, layer: int, parent: int, matrix: str) -> torch.Tensor:
        """Expert ``parent``'s matrix of an MoE SRC (expansion), read once for all its children."""
        return self._once((0, layer, matrix, "expert", parent), lambda: self._read_expert(layer, parent, matrix))

    def moments(self, source: int, layer: int, matrix: str, shard: int | None = None,
                parent: int | None = None) -> surgery.NeuronMoments:
        """Per-neuron moments of the dense matrix, of one shard (as ``shard`` returns it) or of
        SRC's expert ``parent`` (expansion)."""
        def start() -> torch.Tensor:
            if parent is not None:
                return self.expert(layer, parent, matrix)
            return self.get(source, layer, matrix) if shard is None else self.shard(source, layer, matrix, shard)
        return self._once((source, layer, matrix, "moments", shard, parent),
                          lambda: surgery.neuron_moments(start(), matrix))

    def _read(self, source: int, layer: int, matrix: str) -> torch.Tensor:
        ctx = self.ctx
        tensor = ctx.read(source, ctx.shape.ffn_name(layer, matrix))
        if ctx.method.copies(ctx.ratios[layer]) and ctx.opts.granularity == 1:
            # Experts that are plain copies are written straight from this tensor, as many times
            # as there are experts. The experts of a layer are placed alike wherever their size
            # is a multiple of a page; where they are not, the writer copies.
            tensor = ctx.writer.stage(archs.expert_name(ctx.target, layer, 0, matrix), tensor)
        return tensor

    def _read_expert(self, layer: int, parent: int, matrix: str) -> torch.Tensor:
        ctx, family = self.ctx, self.ctx.shape.model_type
        stacked = archs.stacked_in(family, layer, matrix)
        if stacked is not None:  # GraniteMoE: the layer's stacked tensor, read once for every expert
            whole = self._once((0, layer, stacked[0]), lambda: ctx.read(0, stacked[0]))
            tensor = archs.expert_matrix(whole, stacked[1], matrix)[parent]
        else:
            tensor = ctx.read(0, archs.expert_name(family, layer, parent, matrix))
        if ctx.method.copies(ctx.ratios[layer]):  # as _read: staged for the m copies written from it
            tensor = ctx.writer.stage(archs.expert_name(ctx.target, layer, parent * ctx.factor, matrix), tensor)
        return tensor

    def _shard(self, source: int, layer: int, matrix: str, shard: int) -> torch.Tensor:
        ctx, g = self.ctx, routed_group(self.ctx.opts)
        part = surgery.neuron_shard(self.get(source, layer, matrix), matrix, shard, ctx.opts.granularity,
                                    scale=float(g) if matrix == "down" else 1.0)
        if ctx.method.copies(ctx.opts.ratio):  # as _read: staged for the copies written from it
            first = shard - (ctx.opts.shared_expert == "shard")
            part = ctx.writer.stage(archs.expert_name(ctx.target, layer, first, matrix), part)
        return part

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


def _check_source(ck: CheckpointReader, shape: archs.DenseShape, need_ffn: bool) -> None:
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


def _checksum(t: torch.Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()[:16]


def _plan(ctx: Context) -> list[tuple[TensorSpec, Callable]]:
    """Every output tensor, in file order, with the function that makes it."""
    shape, target, o, dt = ctx.shape, ctx.target, ctx.opts, ctx.out_dtype
    non_ffn = shape.non_ffn_tensors()
    plan: list[tuple[TensorSpec, Callable]] = []

    def add(name: str, shp: tuple[int, ...], fn: Callable) -> None:
        plan.append((TensorSpec(dt, tuple(shp), name=name), fn))

    def add_non_ffn(name: str) -> None:
        add(name, non_ffn[name], lambda: non_ffn_tensor(ctx, name, non_ffn[name]))

    def zeros(name: str, shp: tuple[int, ...]) -> None:
        add(name, shp, lambda: torch.zeros(shp, dtype=dt))

    layer_prefix = "model.layers."
    last = ("model.norm.weight", "lm_head.weight")
    for name in non_ffn:
        if not name.startswith(layer_prefix) and name not in last:
            add_non_ffn(name)
    for layer in range(shape.layers):
        for name in non_ffn:
            if name.startswith(f"{layer_prefix}{layer}."):
                add_non_ffn(name)
        if archs.adds_qk_norm(shape, target):
            for name in archs.qk_norm_names(layer):
                add(name, (shape.head_dim,), lambda: torch.ones((shape.head_dim,), dtype=dt))
        if layer not in ctx.moe_layers:
            # A dense layer of a Qwen-MoE keeps the dense MLP under the dense names, made like
            # the non-FFN tensors: copied bit for bit (averaged for btx, drawn for scratch).
            for m in surgery.FFN_MATRICES:
                name = shape.ffn_name(layer, m)
                add(name, shape.ffn_shape(m), partial(non_ffn_tensor, ctx, name, shape.ffn_shape(m)))
            continue
        # Fine-grained experts (--granularity G; g = G routed shards per copy, G - 1 when shard 0
        # is the shared expert): expert e is shard (e mod g) of copy floor(e / g), and the router
        # starts in virtual groups, one row per copy repeated g times (He et al. 2024, arXiv
        # 2410.07524; Megatron-Core's granular upcycling). The g experts of a copy then share
        # one logit, top-(k g) picks k whole copies, and the renormalised weight of each of
        # their experts is p_c / g (p_c: the copy's weight among the k, summing to one); down
        # times g turns the g shards back into the whole FFN: sum_c p_c FFN(x) = FFN(x).
        # docs/granular.md has the derivation and the tie condition.
        g = routed_group(o)
        router_key = surgery.derive_seed(o.seed, "router", layer)
        router = archs.router_name(target, layer)
        if ctx.factor:
            # Expert expansion: each child's row is its parent's, so the m children of a parent
            # form a virtual group as above, of whole experts (docs/expand.md).
            make_router = lambda n=router: surgery.virtual_group_router(ctx.read(0, n), ctx.factor).to(dt)  # noqa: E731
        else:
            make_router = lambda k=router_key: surgery.virtual_group_router(surgery.router_weight(  # noqa: E731
                o.num_experts // g, shape.hidden, o.router_init, o.router_std, k), g).to(dt)
        add(router, (o.num_experts, shape.hidden), make_router)
        build_expert = ctx.method.builder(ctx.ratios[layer])
        fused = archs.fused_experts(target, layer)  # GraniteMoE (never granular: GRANULAR_TARGETS)
        for name, matrices in fused.items():
            rows, cols = ctx.expert_shape(matrices[0])
            add(name, (o.num_experts, rows * len(matrices), cols),
                partial(_stacked_experts, ctx, build_expert, layer, name, matrices))
        for expert in range(o.num_experts if not fused else 0):
            for m in surgery.FFN_MATRICES:
                name = archs.expert_name(target, layer, expert, m)
                if m == "down" and o.shared_expert == "dense":  # the shared expert carries the function
                    zeros(name, ctx.expert_shape(m))
                else:
                    add(name, ctx.expert_shape(m), partial(build_expert, ctx, layer, expert, m, name))
        shared = archs.shared_expert_names(target, layer)
        if ctx.factor:  # an expanded MoE keeps SRC's shared expert (and its gate) as it was
            for name, shp in shape.shared_tensors(layer).items():
                add(name, shp, partial(non_ffn_tensor, ctx, name, shp))
        elif shared:
            # Qwen2-MoE's shared expert is always on: sigmoid(gate(x)) * down(...), its gate at
            # zero so that sigmoid gives 1/2. Silent (the default): a zero down projection makes
            # its output exactly zero at step 0 (so naive upcycling stays function-preserving),
            # while down still receives gradients from the first step on, and through it gate
            # and up. Dense and shard: down doubled (shared_expert_matrix).
            for m in surgery.FFN_MATRICES:
                add(shared[m], ctx.shared_shape(m), partial(shared_expert_matrix, ctx, layer, m))
            zeros(shared["shared_gate"], (1, shape.hidden))
    for name in last:
        if name in non_ffn:
            add_non_ffn(name)
    return plan


class _PartsWriter:
    """The writer as the methods see it when a layer's experts are stacked in one tensor
    (GraniteMoE): the buffer of an expert's part is its slice of the stacked tensor's buffer, so
    each method writes its expert in place, as it would write a tensor of its own."""

    def __init__(self, writer: ShardedWriter):
        self.writer = writer
        self.views: dict[str, torch.Tensor] = {}  # part name -> slice, while its expert is built

    def buffer(self, name: str) -> torch.Tensor:
        return self.views[name] if name in self.views else self.writer.buffer(name)

    def placed(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.views[name].copy_(t) if name in self.views else self.writer.placed(name, t)

    def stage(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t  # parts are copied into the stacked buffer anyway


def _stacked_experts(ctx: Context, build_expert: Callable, layer: int, name: str,
                     matrices: tuple[str, ...]) -> torch.Tensor:
    """A tensor of all experts of one layer, [E, rows, cols], ``matrices`` stacked along dim 1:
    every expert's matrix made by the method, as in the per-expert layout, into its slice."""
    parts: _PartsWriter = ctx.writer
    out = parts.writer.buffer(name)
    for expert in range(ctx.opts.num_experts):
        for m in matrices:
            part, view = archs.expert_name(ctx.target, layer, expert, m), archs.expert_matrix(out, matrices, m)[expert]
            parts.views[part] = view
            try:
                made = build_expert(ctx, layer, expert, m, part)
            finally:
                del parts.views[part]
            if made.data_ptr() != view.data_ptr():
                view.copy_(made)
    return out


def _resolve_dtype(opts: UpcycleOptions, src: CheckpointReader) -> torch.dtype:
    if opts.dtype != "auto":
        return DTYPE_NAMES[opts.dtype]
    dtype = src.tensors["model.embed_tokens.weight"].dtype
    return dtype if dtype in DTYPE_NAMES.values() else torch.float32


def _progress(enabled: bool):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    return Progress(TextColumn("[bold]upcycle"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=True)


def upcycle(src: str | os.PathLike, out: str | os.PathLike, opts: UpcycleOptions | None = None,
            **options) -> dict:
    """Convert the dense checkpoint ``src`` into an MoE checkpoint at ``out``.

    Options are an :class:`UpcycleOptions` or its fields as keywords (the CLI flags with ``-`` as
    ``_``); keywords given with ``opts`` override its fields. Returns the provenance record that
    is also written to ``out/upcycling.json``. Raises :class:`dropup.UserError` for bad input,
    leaving ``out`` untouched.
    """
    unknown = set(options) - set(UpcycleOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown upcycle option(s): {', '.join(sorted(unknown))}")
    opts = dataclasses.replace(opts or UpcycleOptions(), **options)
    opts.sources = [str(s) for s in opts.sources]
    opts.validate()
    with contextlib.ExitStack() as held:
        # A GGUF source is dequantised into a temporary checkpoint beside OUT (hub/gguf.py),
        # removed when the conversion ends; a checkpoint directory is read as it is.
        log = (lambda line: print(f"dropup: {line}", file=sys.stderr, flush=True)) if opts.progress else None
        local = [held.enter_context(dense_source(p, beside=out, what=what, log=log, progress=opts.progress))
                 for what, p in [("SRC", src), *(("btx source", s) for s in opts.sources)]]
        return _upcycle(src, out, opts, local)


def _upcycle(src, out, opts: UpcycleOptions, local: list[Path]) -> dict:
    """``upcycle`` once every source is a checkpoint directory (``local``: SRC's, then the btx sources')."""
    t0 = time.perf_counter()
    out = Path(out)
    method = METHODS[opts.method]
    main = CheckpointReader(local[0], "SRC")
    shape = archs.source_shape(main.config, f"SRC {main.path}")
    target = archs.resolve_target(shape, opts.target)
    if isinstance(shape, archs.MoEShape):
        _check_expansion(opts, shape)
    opts.top_k = _resolve_top_k(opts, shape)
    layer_ratios = ratios.per_layer(opts.ratio, shape.layers)
    _check_layout(opts, shape, target)
    sources = [main]
    for s in local[1:]:
        ck = CheckpointReader(s, "btx source")
        other = archs.dense_shape(ck.config, f"btx source {ck.path}")
        if other != shape:
            raise UserError(f"btx source {ck.path} has a different shape from SRC "
                            f"({_shape_diff(shape, other)}); all sources must share one shape")
        sources.append(ck)
    for ck in sources:
        _check_source(ck, shape, need_ffn=method.needs_dense_ffn)
    out_dtype = _resolve_dtype(opts, main)
    dtype_name = {v: k for k, v in DTYPE_NAMES.items()}[out_dtype]
    if isinstance(shape, archs.MoEShape):
        moe = expand_moe(shape.config, num_experts=opts.num_experts, top_k=opts.top_k,
                         aux_loss_coef=opts.aux_loss_coef)
    else:
        moe = dense_to_moe(shape.config, target, num_experts=opts.num_experts, top_k=opts.top_k,
                           aux_loss_coef=opts.aux_loss_coef, moe_layers=opts.moe_layers)
    if target in archs.GRANULAR_TARGETS and not isinstance(shape, archs.MoEShape):
        # the expert widths (the dense d_f unless --granularity says)
        moe = dataclasses.replace(moe, moe_intermediate_size=shape.d_f // opts.granularity,
                                  shared_expert_intermediate_size=shared_expert_width(opts, shape.d_f)
                                  if archs.shared_expert_names(target, 0) else 0)
    # The installed version, read from package metadata: importing transformers costs a second.
    config = moe.to_hf(dtype=dtype_name, transformers_version=version("transformers"))
    ctx = Context(opts, method, shape, target, out_dtype, sources, layer_ratios, moe_layers=moe.moe_layers)
    if opts.verify:
        from dropup.convert.verify import verify, windows

        verify_tokens = windows(shape.config.vocab_size, main.path, opts.verify_text, opts.seed)
    plan = _plan(ctx)
    total = sum(spec.nbytes for spec, _ in plan)
    router_bias = _expanded_router_bias(ctx) if ctx.factor else None
    with atomic_dir(out, existing="replace" if opts.overwrite else "refuse",
                    advice="pass --overwrite to replace it or choose another path",
                    protect=[("SRC", src), *(("btx source", s) for s in opts.sources)],
                    full_advice="free space (see upcycle's size estimate)") as tmp:
        check_free_space(out, total + (64 << 20))
        with ShardedWriter(tmp, [spec for spec, _ in plan], parse_size(opts.max_shard_size)) as writer:
            ctx.writer = _PartsWriter(writer) if archs.fused_experts(target, 0) else writer
            _run_plan(plan, writer, opts)
        (tmp / "config.json").write_text(config_json(config))
        side = main.copy_side_files(tmp)
        bias_file = ROUTER_BIAS_FILE if router_bias is not None else None
        if router_bias is not None:
            write_router_bias_file(tmp, router_bias)
        for (layer, expert), entry in ctx.experts.items():
            entry["intact_fraction"] = intact_fraction(ctx, layer, expert)
        provenance = _provenance(ctx, side, total, time.perf_counter() - t0, bias_file)
        (tmp / "upcycling.json").write_text(json.dumps(provenance, indent=1) + "\n")
        write_model_card(tmp, _card_info(ctx, plan, provenance))
        if opts.verify:
            provenance["verify"] = verify(main.path, tmp, provenance, verify_tokens, progress=opts.progress)
            (tmp / "upcycling.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return provenance


def _run_plan(plan: list[tuple[TensorSpec, Callable]], writer: ShardedWriter, opts: UpcycleOptions) -> None:
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
            bar.advance(task, spec.nbytes)


def _shape_diff(a: archs.DenseShape, b: archs.DenseShape) -> str:
    differ = [f.name for f in dataclasses.fields(a) if f.compare and getattr(a, f.name) != getattr(b, f.name)]
    return ", ".join(f"{k} {getattr(a, k)} vs {getattr(b, k)}" for k in differ)


def _expanded_router_bias(ctx: Context) -> dict[str, torch.Tensor] | None:
    """SRC's router-bias file (aux-loss-free balancing), if it has one, expanded like its routers
    (read before any work, so a damaged file costs none). A child's bias is its parent's divided
    by m: the bias is added to the router probabilities, and each child's probability is its
    parent's / m, so the biased scores keep their order and the biased top-(k m) choice is the
    children of SRC's biased top-k (docs/expand.md)."""
    names = [archs.router_bias_name(ctx.shape.model_type, layer) for layer in ctx.moe_layers]
    found = read_router_bias_file(ctx.sources[0].path, names, ctx.shape.experts)
    if found is None:
        return None
    return {archs.router_bias_name(ctx.target, layer): surgery.child_selection_bias(found[name], ctx.factor)
            for layer, name in zip(ctx.moe_layers, names)}


def _expansion_record(ctx: Context, bias_file: str | None) -> dict:
    """What ``upcycling.json`` says of an expansion: SRC's E and k, the factor, each child's parent."""
    shape, o = ctx.shape, ctx.opts
    return {"source_experts": shape.experts, "source_top_k": shape.top_k, "factor": ctx.factor,
            "parents": [ctx.parent(e) for e in range(o.num_experts)],
            # top-(k m) keeps SRC's function with naive copies; another k changes the routing
            "top_k_preserves": o.top_k == shape.top_k * ctx.factor,
            **({"router_bias": bias_file} if bias_file else {})}


def _card_info(ctx: Context, plan: list[tuple[TensorSpec, Callable]], provenance: dict) -> dict:
    shape, o = ctx.shape, ctx.opts
    routed = len(ctx.moe_layers) * o.num_experts * sum(math.prod(ctx.expert_shape(m)) for m in surgery.FFN_MATRICES)
    total, active = parameter_counts({spec.name: spec.shape for spec, _ in plan}, routed, o.num_experts, o.top_k)
    return {"model_type": ctx.target, "layers": shape.layers, "num_experts": o.num_experts, "top_k": o.top_k,
            "total_params": total, "active_params": active, "base_model": model_name(ctx.sources[0].path),
            "upcycling": upcycling_info(provenance)}


def _provenance(ctx: Context, side: list[str], total: int, seconds: float, bias_file: str | None = None) -> dict:
    from dropup._version import __version__

    opts, main, shape = ctx.opts, ctx.sources[0], ctx.shape

    def entry(rec: dict) -> dict:
        # Producers run on a thread pool and fill rec in completion order: write a fixed order.
        return {k: rec[k] for k in (*surgery.FFN_MATRICES, "intact_fraction") if k in rec}

    # One list per decoder layer, empty for a layer kept dense.
    per_layer = [[{"expert": e, **entry(ctx.experts[(layer, e)])} for e in range(opts.num_experts)
                  if (layer, e) in ctx.experts] for layer in range(shape.layers)]
    intact = [x["intact_fraction"] for layer in per_layer for x in layer]
    by_source: dict[str, dict[str, str]] = {}
    for (path, name), digest in sorted(ctx.checksums.items()):
        by_source.setdefault(path, {})[name] = digest
    return {
        "dropup_version": __version__,
        "method": opts.method,
        "options": recorded_options(opts),
        # the r each layer was built with, where the spec gives one per layer
        **({"ratio_per_layer": list(ctx.ratios)} if ratios.is_per_layer(opts.ratio) else {}),
        "seed": opts.seed,
        **({"expansion": _expansion_record(ctx, bias_file)} if ctx.factor else {}),
        "target": ctx.target,
        "function_preserving_target": archs.function_preserving_target(shape, ctx.target),
        "dtype": str(ctx.out_dtype).removeprefix("torch."),
        "source": {
            "path": str(main.path.resolve()),
            "config": main.config,
            "tensor_sha256_16": by_source.get(str(main.path), {}),
            **gguf_origin(main.path),  # a GGUF source: its path and digest, not the temporary copy's
        },
        "btx_sources": [{"path": str(s.path.resolve()), "config": s.config,
                         "tensor_sha256_16": by_source.get(str(s.path), {}), **gguf_origin(s.path)}
                        for s in ctx.sources[1:]],
        "side_files": side,
        "output_bytes": total,
        "seconds": round(seconds, 3),
        "mean_intact_fraction": sum(intact) / len(intact),
        "moe_layers": list(ctx.moe_layers),
        "layers": per_layer,
    }
