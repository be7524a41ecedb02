"""Routing statistics of MoE layers: top-k assignments per expert, load fractions, router entropy.

Pure torch on router logits, so training logs them as it goes and analysis reads them back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dropup.model.decoder import select_experts


def topk_ids(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The experts each row of router logits [N, E] is sent to, [N, k], best first: the softmax's
    top-k as the models route (Mixtral, Qwen-MoE; norm_topk_prob rescales weights, not ids), with
    the layer's selection bias [E] where it has one (``MoE.selection_bias``)."""
    return select_experts(logits.detach().float().softmax(dim=-1), bias, top_k)


def expert_counts(
    router_logits: list[torch.Tensor], top_k: int, num_experts: int, mask: torch.Tensor | None = None,
    biases: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Top-k assignments per expert, [layers, E] (fp32, no gradient), optionally only where
    ``mask`` (flattened like the router logits' rows) is nonzero. ``biases``: each layer's
    selection bias (``selection_biases(model)``), so that the counts are the routing the layers
    actually do.

    Summed over micro-batches and all-reduced over ranks this is what a global-batch balance
    loss needs; pass the normalised result to ``load_balancing_loss(token_fractions=...)``.
    """
    rows = []
    for i, logits in enumerate(router_logits):
        ids = topk_ids(logits, top_k, biases[i] if biases else None)
        w = torch.ones_like(ids, dtype=torch.float32)
        if mask is not None:
            w = w * mask.reshape(-1, 1).to(w)
        rows.append(torch.zeros(num_experts, device=logits.device).scatter_add_(0, ids.reshape(-1), w.reshape(-1)))
    return torch.stack(rows)


def _token_entropy(router_logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each token's routing distribution, [N]."""
    logp = router_logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def router_metrics(router_logits: list[torch.Tensor], top_k: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-layer diagnostics of one batch: load fractions [L, E] (sum to 1), max/min load ratio
    [L] (inf when an expert got nothing), max/mean load [L] (1 = balanced, E / k at most) and mean
    router entropy in nats [L]."""
    stats = RouterStats()
    stats.add(router_logits, top_k, num_experts)
    return _summary(stats.counts, stats.entropy_sum, stats.tokens)


def _summary(counts: torch.Tensor, entropy_sum: torch.Tensor, tokens) -> dict[str, torch.Tensor]:
    load = counts / counts.sum(-1, keepdim=True)
    return {"load": load, "max_min_ratio": load.max(-1).values / load.min(-1).values,
            "max_mean": load.max(-1).values * load.shape[-1], "entropy": entropy_sum / tokens}


class RouterStats:
    """Accumulates per-layer routing statistics over the micro-batches of a log interval."""

    def __init__(self):
        self.counts: torch.Tensor | None = None
        self.entropy_sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, router_logits: list[torch.Tensor], top_k: int, num_experts: int,
            biases: list[torch.Tensor] | None = None) -> None:
        with torch.no_grad():
            counts = expert_counts(router_logits, top_k, num_experts, biases=biases)
            ent = torch.stack([_token_entropy(r).sum() for r in router_logits])
        self.counts = counts if self.counts is None else self.counts + counts
        self.entropy_sum = ent if self.entropy_sum is None else self.entropy_sum + ent
        self.tokens += router_logits[0].shape[0]

    def reduce(self, group=None) -> dict[str, list] | None:
        """Load fractions [L][E], max/min load ratio [L] (None when an expert got no token),
        max/mean load [L] and mean router entropy in nats [L], over all ranks. Collective: every
        rank must call it."""
        if self.counts is None:
            return None
        buf = torch.cat([self.counts.flatten(), self.entropy_sum,
                         torch.tensor([float(self.tokens)], device=self.counts.device)])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(buf, group=group)
        n_layers, e = self.counts.shape
        m = _summary(buf[: n_layers * e].view(n_layers, e), buf[n_layers * e : n_layers * e + n_layers], buf[-1])
        return {
            "router_load": [[round(x, 5) for x in row] for row in m["load"].tolist()],
            "router_max_min_ratio": [round(x, 4) if x != float("inf") else None for x in m["max_min_ratio"].tolist()],
            "router_max_mean": [round(x, 4) for x in m["max_mean"].tolist()],
            "router_entropy": [round(x, 5) for x in m["entropy"].tolist()],
        }
