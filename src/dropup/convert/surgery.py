"""Weight surgery for MoE construction: pure functions, tensors in, tensors out.

Nothing here touches files. Every random draw comes from an explicit stream: a ``torch.Generator``
seeded from ``derive_seed`` (index sets, uniform routers) or a ``derive_seed`` key of the
counter-based sampler in ``gauss`` (Gaussian values), so a tensor's value depends only on (seed,
layer, expert, matrix), never on the order in which tensors are produced or on how the output is
sharded.

Layout convention (PyTorch ``nn.Linear``): gate and up are ``[d_f, d_h]`` and their intermediate
neurons are rows; down is ``[d_h, d_f]`` and its intermediate neurons are columns.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from dropup.convert.gauss import gaussian

FFN_MATRICES = ("gate", "up", "down")
# The axis of each FFN matrix that indexes intermediate neurons.
NEURON_AXIS = {"gate": 0, "up": 0, "down": 1}


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one random stream, e.g. ``derive_seed(0, "layer", 3, "expert", 5, "up")``.

    Hashing (instead of ``seed + offset`` arithmetic) keeps streams of different layers, experts
    and matrices independent and lets new kinds of streams be added without shifting old ones.
    """
    key = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))


def num_reinit(d_f: int, ratio: float) -> int:
    """floor(r * d_f), computed so that e.g. r=0.5 never loses a neuron to float rounding."""
    return int(math.floor(ratio * d_f + 1e-9))


def sample_indices(d_f: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """floor(r * d_f) distinct neuron indices, uniformly without replacement, sorted."""
    n = num_reinit(d_f, ratio)
    return torch.randperm(d_f, generator=gen)[:n].sort().values


def take_neurons(weight: torch.Tensor, matrix: str, idx: torch.Tensor) -> torch.Tensor:
    return weight.index_select(NEURON_AXIS[matrix], idx)


def put_neurons(
    weight: torch.Tensor, matrix: str, idx: torch.Tensor, values: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight`` with neurons ``idx`` replaced by ``values``, written into ``out`` when given (its
    dtype is the result's; callers reuse buffers so gigabytes of experts cost no fresh memory)."""
    if out is None:
        out = torch.empty_like(weight)
    out.copy_(weight)
    out.index_copy_(NEURON_AXIS[matrix], idx, values.to(out.dtype))
    return out


class Scratch:
    """Reusable work tensors keyed by name: one per thread, grown on demand, never shrunk."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._bufs[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


@dataclass(frozen=True)
class ReinitStats:
    mean: float
    std: float

    def scaled(self, scale: float) -> ReinitStats:
        """The same mean, the standard deviation times ``scale`` (``--reinit-scale``: gentler
        re-drawn neurons add less noise to the residual stream; 1 returns equal numbers)."""
        return ReinitStats(self.mean, self.std * scale)


def reinit_stats(dense: torch.Tensor, matrix: str, idx: torch.Tensor, over: str) -> ReinitStats:
    """Mean and std that the replacement values are drawn with.

    ``over="slice"`` uses the values being replaced (what the authors' released script does);
    ``over="matrix"`` uses the whole dense matrix. Statistics are taken in float64 so they do not
    depend on the storage dtype's rounding.
    """
    if over == "matrix":
        src = dense
    elif over == "slice":
        src = take_neurons(dense, matrix, idx)
    else:
        raise ValueError(f"unknown reinit statistics {over!r}")
    src = src.to(torch.float64)
    if src.numel() < 2:
        return ReinitStats(float(src.mean()) if src.numel() else 0.0, 0.0)
    return ReinitStats(float(src.mean()), float(src.std()))


@dataclass(frozen=True)
class NeuronMoments:
    """Per-neuron sum and sum of squares of one dense matrix (float64), and values per neuron.

    Slice statistics for any neuron set then cost O(d_f) instead of a pass over the slice, which
    matters because every expert of every layer draws its own set.
    """

    sums: torch.Tensor
    sumsq: torch.Tensor
    per_neuron: int


def neuron_moments(dense: torch.Tensor, matrix: str, block: int = 256) -> NeuronMoments:
    """Per-neuron sums, a block of rows at a time: matrix-vector products (BLAS) run at memory
    speed, and block-sized temporaries avoid touching fresh memory for a whole widened copy.

    Blocks are always rows of the stored matrix (contiguous); for down, whose neurons are
    columns, the product runs with the block transposed instead of gathering strided columns.
    """
    wide = torch.float64 if dense.dtype in (torch.float32, torch.float64) else torch.float32
    by_rows = NEURON_AXIS[matrix] == 0
    rows_total, cols = dense.shape
    n, per = (rows_total, cols) if by_rows else (cols, rows_total)
    sums = torch.zeros(n, dtype=torch.float64)
    sumsq = torch.zeros(n, dtype=torch.float64)
    ones = torch.ones(cols if by_rows else block, dtype=wide)
    buf = torch.empty(min(block, rows_total), cols, dtype=wide)
    part = torch.empty(n if not by_rows else min(block, rows_total), dtype=wide)
    for start in range(0, rows_total, block):
        rows = buf[: min(block, rows_total - start)]
        rows.copy_(dense[start:start + block])
        k = rows.shape[0]
        for acc, square in ((sums, False), (sumsq, True)):
            if square:
                rows.mul_(rows)
            if by_rows:
                acc[start:start + k] = torch.mv(rows, ones, out=part[:k])
            else:
                acc += torch.mv(rows.t(), ones[:k], out=part)
    return NeuronMoments(sums, sumsq, per)


def stats_from_moments(mom: NeuronMoments, idx: torch.Tensor | None) -> ReinitStats:
    """Mean and (unbiased) std over neurons ``idx`` (all neurons when None)."""
    s, q = (mom.sums, mom.sumsq) if idx is None else (mom.sums[idx], mom.sumsq[idx])
    n = s.numel() * mom.per_neuron
    if n < 2:
        return ReinitStats(float(s.sum()) / n if n else 0.0, 0.0)
    total = float(s.sum())
    mean = total / n
    var = max(float(q.sum()) - total * mean, 0.0) / (n - 1)
    return ReinitStats(mean, math.sqrt(var))


def _normal(shape: tuple[int, ...], mean: float, std: float, key: int,
            scratch: Scratch | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(mean, std^2) values of stream ``key``; in ``dtype`` they are the float32 values rounded
    to nearest, so asking for bfloat16 directly only saves a pass."""
    out = scratch.get("normal", shape, dtype) if scratch is not None else None
    return gaussian(shape, mean, std, key, dtype, out=out)


def _neuron_shape(dense: torch.Tensor, matrix: str, n: int) -> tuple[int, ...]:
    shape = list(dense.shape)
    shape[NEURON_AXIS[matrix]] = n
    return tuple(shape)


def drop_reinit(
    dense: torch.Tensor, matrix: str, idx: torch.Tensor, stats: ReinitStats, key: int,
    out: torch.Tensor | None = None, scratch: Scratch | None = None,
) -> torch.Tensor:
    """Drop-Upcycling step 2: neurons ``idx`` re-drawn i.i.d. from N(mean, std^2), the rest kept.

    ``key`` names the random stream (``derive_seed``). The values are drawn as float32 and
    rounded once to the result's dtype.
    """
    dtype = out.dtype if out is not None and out.dtype == torch.bfloat16 else torch.float32
    values = _normal(_neuron_shape(dense, matrix, idx.numel()), stats.mean, stats.std, key,
                     scratch, dtype)
    return put_neurons(dense, matrix, idx, _cast(values, out, scratch), out)


def silence_neurons(
    dense: torch.Tensor, matrix: str, idx: torch.Tensor, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dense`` with neurons ``idx`` set to zero (``--reinit-down zeros`` on down's columns):
    a neuron whose down column is zero adds nothing to the expert's output, whatever gate and up
    compute, while that column still receives gradients (gate and up are re-drawn, so the
    neuron's activation is not zero) and the neuron learns from the first step."""
    if out is None:
        out = torch.empty_like(dense)
    out.copy_(dense)
    return out.index_fill_(NEURON_AXIS[matrix], idx, 0)


def add_noise(
    dense: torch.Tensor, matrix: str, idx: torch.Tensor, std: float, key: int,
    out: torch.Tensor | None = None, scratch: Scratch | None = None,
) -> torch.Tensor:
    """Random Noise Upcycling: N(0, std^2) added (not substituted) to neurons ``idx``.

    The sum is formed in float32 and rounded once to the storage dtype.
    """
    noise = _normal(_neuron_shape(dense, matrix, idx.numel()), 0.0, std, key, scratch)
    noise += take_neurons(dense, matrix, idx)
    return put_neurons(dense, matrix, idx, _cast(noise, out, scratch), out)


def _cast(values: torch.Tensor, out: torch.Tensor | None, scratch: Scratch | None) -> torch.Tensor:
    """``values`` rounded to the output dtype, in a scratch buffer when one is available."""
    if out is None or scratch is None or values.dtype == out.dtype:
        return values
    return scratch.get("cast", tuple(values.shape), out.dtype).copy_(values)


def router_weight(num_experts: int, hidden: int, init: str, std: float, key: int) -> torch.Tensor:
    """A fresh router [E, d_h] (float32; the caller casts to the output dtype).

    ``uniform`` is the authors' choice: zero-mean uniform with standard deviation ``std``, i.e.
    (U[0,1) - 0.5) * std * sqrt(12).
    """
    shape = (num_experts, hidden)
    if init == "uniform":
        gen = torch.Generator(device="cpu").manual_seed(key)
        u = torch.rand(shape, generator=gen, dtype=torch.float32)
        return (u - 0.5) * (std * math.sqrt(12.0))
    if init == "normal":
        return _normal(shape, 0.0, std, key)
    if init == "zeros":
        return torch.zeros(shape, dtype=torch.float32)
    raise ValueError(f"unknown router init {init!r}")


def scratch_weight(shape: tuple[int, ...], std: float, key: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """From-scratch initialisation of a weight matrix: N(0, std^2), drawn in float32 and rounded
    once to ``dtype``."""
    return gaussian(tuple(shape), 0.0, std, key, dtype)


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean in float32 (Branch-Train-MiX merges non-FFN tensors this way)."""
    acc = tensors[0].to(torch.float32).clone()
    for t in tensors[1:]:
        acc += t.to(torch.float32)
    return acc / len(tensors)


def neuron_shard(dense: torch.Tensor, matrix: str, shard: int, granularity: int,
                 scale: float = 1.0) -> torch.Tensor:
    """Shard ``shard`` of ``granularity`` equal contiguous neuron ranges of a dense FFN matrix
    (fine-grained upcycling), as a fresh contiguous tensor; down's columns times ``scale`` (the
    factor that makes a group's renormalised routing weights sum back to one, see ``upcycle``).
    Scaling by a power of two is exact in every float format."""
    width = dense.shape[NEURON_AXIS[matrix]] // granularity
    out = dense.narrow(NEURON_AXIS[matrix], shard * width, width).contiguous()
    if scale != 1.0:
        out = (out.to(torch.float32) * scale).to(dense.dtype)
    return out


def virtual_group_router(copies: torch.Tensor, group: int) -> torch.Tensor:
    """A router [E, d_h] whose experts come in groups of ``group`` with identical rows, from one
    row per group: the G fine-grained experts of one copy of the dense FFN then get identical
    logits (the "virtual group" initialisation of He et al. 2024, arXiv 2410.07524, also in
    Megatron-Core's granular upcycling), so top-(kG) routing selects whole groups."""
    return copies.repeat_interleave(group, dim=0)


def child_selection_bias(bias: torch.Tensor, factor: int) -> torch.Tensor:
    """Expert expansion of a selection bias [E] (aux-loss-free balancing, added to the router
    probabilities for the top-k choice): each parent's bias divided by ``factor`` for each of its
    ``factor`` contiguous children, whose probabilities are the parent's divided by ``factor``;
    the biased scores then keep their order. Exact for a power-of-two factor."""
    return (bias.to(torch.float32) / factor).repeat_interleave(factor)


def btx_source_of_expert(expert: int, num_experts: int, num_sources: int) -> int:
    """Branch-Train-MiX assignment: expert e takes its FFN from source floor(e * n / E)."""
    return (expert * num_sources) // num_experts
