"""The construction methods of the Drop-Upcycling paper, one table entry each.

An entry says how the method builds an expert matrix, what it does to the non-FFN tensors
(embeddings, attention, norms, LM head; also the gate and up of Qwen2-MoE's shared expert), which
fraction of each expert's neurons it leaves intact, whether its experts are plain copies of a
dense FFN, whether it reads the dense FFN at all, and whether the MoE it builds computes the dense
function at step 0. Everything else (planning, reading, writing, provenance) is the same for all
methods, so adding one is adding an entry. The weight surgery itself is ``surgery``'s.

The builders run on upcycle's worker threads and take its ``Context`` (sources, options, the
cache of dense FFN matrices, the writer's buffers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from dropup.convert import surgery

if TYPE_CHECKING:
    from dropup.convert.upcycle import Context

# (ctx, layer, expert, matrix, output tensor name) -> the expert's matrix
ExpertBuilder = Callable[["Context", int, int, str, str], torch.Tensor]
NonFFN = Literal["copy", "mean", "init"]  # from SRC / the float32 mean of the sources / fresh


@dataclass(frozen=True)
class Method:
    """What one construction method does; ``copies`` and ``preserves_dense`` take ``--ratio``."""

    expert: ExpertBuilder
    non_ffn: NonFFN
    intact: float | None  # share of each expert's neurons left as they were; None: outside the index sets
    copies: Callable[[float], bool]  # at this ratio every expert is a plain copy of a dense FFN
    preserves_dense: Callable[[float], bool]  # at this ratio the MoE computes the dense function at step 0
    changes: str = ""  # what makes the step-0 MoE differ from the dense model ({ratio} is --ratio)
    needs_dense_ffn: bool = True
    sources: bool = False  # takes --sources: one dense model per group of experts

    @property
    def uses_ratio(self) -> bool:
        """--ratio picks the neurons it changes (its intact fraction follows the index sets)."""
        return self.intact is None

    def builder(self, ratio: float) -> ExpertBuilder:
        return copy_expert if self.copies(ratio) else self.expert


def routed_group(opts) -> int:
    """Fine-grained experts per copy of the dense FFN (a virtual group): G, or G - 1 where shard 0
    of every copy is the shared expert (``--shared-expert shard``)."""
    return opts.granularity - (opts.shared_expert == "shard")


def expert_shard(opts, expert: int) -> tuple[int, int]:
    """(copy, shard) that routed expert ``expert`` starts from: shard (e mod g) of copy
    floor(e / g), the shards counted after the shared expert's when it takes shard 0."""
    g = routed_group(opts)
    return expert // g, expert % g + (opts.shared_expert == "shard")


def start_matrix(ctx: Context, source: int, layer: int, expert: int, matrix: str) -> torch.Tensor:
    """The dense matrix an expert starts from: the whole dense FFN's, or with ``--granularity``
    its shard, down scaled by the group size (see ``upcycle``'s note on exactness); when expanding
    an MoE, the SRC expert that is the child's parent."""
    if ctx.factor:
        return ctx.cache.expert(layer, ctx.parent(expert), matrix)
    if ctx.opts.granularity == 1:
        return ctx.cache.get(source, layer, matrix)
    return ctx.cache.shard(source, layer, matrix, expert_shard(ctx.opts, expert)[1])


def index_sets(ctx: Context, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The neurons each FFN matrix of one expert re-initialises (drop) or perturbs (noise), among
    the expert's own (d_f / G of them with ``--granularity G``), r of them at this layer's r."""
    o, d_f, ratio = ctx.opts, ctx.expert_width, ctx.ratios[layer]
    if o.index_sampling == "shared":
        idx = surgery.sample_indices(d_f, ratio, surgery.generator(o.seed, "indices", layer, expert))
        return {m: idx for m in surgery.FFN_MATRICES}
    return {m: surgery.sample_indices(d_f, ratio, surgery.generator(o.seed, "indices", layer, expert, m))
            for m in surgery.FFN_MATRICES}


def copy_expert(ctx: Context, layer: int, expert: int, matrix: str, name: str) -> torch.Tensor:
    """The FFN of the source this expert comes from (btx's assignment; with one source, the dense
    FFN), written straight from the cached matrix when the writer can take it as it is."""
    g = routed_group(ctx.opts)
    source = surgery.btx_source_of_expert(expert // g, ctx.opts.num_experts // g, len(ctx.sources))
    return ctx.writer.placed(name, start_matrix(ctx, source, layer, expert, matrix))


def _to_change(ctx: Context, layer: int, expert: int, matrix: str, name: str):
    """What drop and noise start from: the dense matrix, the neurons this expert changes, the key
    of its random values and the output buffer."""
    return (start_matrix(ctx, 0, layer, expert, matrix), index_sets(ctx, layer, expert)[matrix],
            surgery.derive_seed(ctx.opts.seed, "values", layer, expert, matrix), ctx.writer.buffer(name))


def _drop_expert(ctx: Context, layer: int, expert: int, matrix: str, name: str) -> torch.Tensor:
    dense, idx, key, out = _to_change(ctx, layer, expert, matrix, name)
    o = ctx.opts
    if matrix == "down" and o.reinit_down == "zeros":
        surgery.silence_neurons(dense, matrix, idx, out=out)
        stats = surgery.ReinitStats(0.0, 0.0)  # what zeros are drawn from
    else:
        shard = expert_shard(o, expert)[1] if o.granularity > 1 else None
        parent = ctx.parent(expert) if ctx.factor else None  # expansion: the parent's statistics
        stats = surgery.stats_from_moments(ctx.cache.moments(0, layer, matrix, shard, parent),
                                           idx if o.reinit_stats == "slice" else None).scaled(o.reinit_scale)
        surgery.drop_reinit(dense, matrix, idx, stats, key, out=out, scratch=ctx.scratch())
    ctx.experts[(layer, expert)][matrix] = {"reinit_fraction": idx.numel() / ctx.expert_width,
                                            "mean": stats.mean, "std": stats.std}
    return out


def _noise_expert(ctx: Context, layer: int, expert: int, matrix: str, name: str) -> torch.Tensor:
    dense, idx, key, out = _to_change(ctx, layer, expert, matrix, name)
    surgery.add_noise(dense, matrix, idx, ctx.opts.noise_std, key, out=out, scratch=ctx.scratch())
    ctx.experts[(layer, expert)][matrix] = {"reinit_fraction": idx.numel() / ctx.expert_width,
                                            "noise_std": ctx.opts.noise_std}
    return out


def _scratch_expert(ctx: Context, layer: int, expert: int, matrix: str, name: str) -> torch.Tensor:
    key = surgery.derive_seed(ctx.opts.seed, "scratch", layer, expert, matrix)
    return surgery.scratch_weight(ctx.expert_shape(matrix), ctx.opts.init_std, key, ctx.out_dtype)


def _always(ratio: float) -> bool:
    return True


def _never(ratio: float) -> bool:
    return False


def _at_ratio_zero(ratio: float) -> bool:
    return ratio == 0.0


METHODS: dict[str, Method] = {
    # Drop-Upcycling: copies, a fraction r of each expert's neurons re-drawn from N(mean, std^2)
    "drop": Method(_drop_expert, "copy", intact=None, copies=_at_ratio_zero,
                   preserves_dense=_at_ratio_zero,
                   changes="re-draws r = {ratio} of each expert's neurons at random"),
    # Sparse Upcycling (Komatsuzaki et al., 2023)
    "naive": Method(copy_expert, "copy", intact=1.0, copies=_always, preserves_dense=_always),
    # Random Noise Upcycling: copies, N(0, noise_std^2) added to a fraction r of the neurons
    "noise": Method(_noise_expert, "copy", intact=None, copies=_at_ratio_zero,
                    preserves_dense=_at_ratio_zero,
                    changes="adds Gaussian noise to r = {ratio} of each expert's neurons"),
    # From Scratch: the MoE drawn from N(0, init_std^2), norms at one; only SRC's config is used
    "scratch": Method(_scratch_expert, "init", intact=0.0, copies=_never, preserves_dense=_never,
                      changes="draws every weight at random (only SRC's shape is used)", needs_dense_ffn=False),
    # Branch-Train-MiX (Sukhbaatar et al., 2024): expert e from source floor(e * n / E)
    "btx": Method(copy_expert, "mean", intact=1.0, copies=_always, preserves_dense=_never,
                  changes="averages the sources' non-FFN weights and mixes differently trained experts",
                  sources=True),
}
MethodName = Literal[*METHODS]


def intact_fraction(ctx: Context, layer: int, expert: int) -> float:
    """The fraction of one expert's neurons untouched in all three matrices."""
    if not ctx.method.uses_ratio:
        return ctx.method.intact
    touched = torch.zeros(ctx.expert_width, dtype=torch.bool)
    for idx in index_sets(ctx, layer, expert).values():
        touched[idx] = True
    return 1.0 - touched.sum().item() / ctx.expert_width


def non_ffn_tensor(ctx: Context, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor that is not part of the dense FFN, at step 0."""
    o, dt = ctx.opts, ctx.out_dtype
    if ctx.method.non_ffn == "init":
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dt)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=dt)
        return surgery.scratch_weight(shape, o.init_std, surgery.derive_seed(o.seed, "scratch", name), dt)
    if ctx.method.non_ffn == "mean":
        return surgery.mean_of([ctx.read(i, name) for i in range(len(ctx.sources))]).to(dt)
    # Written as it comes (buffered when misaligned): a page-aligned copy of an embedding would
    # double its memory for a gain of well under a second.
    return ctx.read(0, name).to(dt)


def shared_expert_matrix(ctx: Context, layer: int, matrix: str) -> torch.Tensor:
    """A matrix of Qwen2-MoE's shared expert at step 0 (``--shared-expert``), from the dense FFN
    (the mean of the sources), or fresh where the non-FFN tensors are. silent: gate and up the
    dense FFN's first neurons, down zero. dense: the whole dense FFN; shard: its shard 0; in both,
    down doubled, because the shared expert's gate starts at zero and sigmoid(0) = 1/2."""
    o, shape = ctx.opts, ctx.shared_shape(matrix)
    if matrix == "down" and o.shared_expert == "silent":
        return torch.zeros(shape, dtype=ctx.out_dtype)
    if ctx.method.non_ffn == "init":
        key = surgery.derive_seed(o.seed, "scratch", layer, "shared", matrix)
        return surgery.scratch_weight(shape, o.init_std, key, ctx.out_dtype)
    dense = surgery.mean_of([ctx.cache.get(i, layer, matrix) for i in range(len(ctx.sources))])
    if o.shared_expert == "shard":
        part = surgery.neuron_shard(dense, matrix, 0, o.granularity)
    else:
        part = dense.narrow(surgery.NEURON_AXIS[matrix], 0, ctx.shared_width)
    return (part * 2.0 if matrix == "down" else part).to(ctx.out_dtype)
