"""Router balancing in MoE training: the load-balancing loss (pooled, per layer or over the global
batch), the z-loss, and the update rule of aux-loss-free balancing (``bias_step``). The next-token
loss lives beside the model (``dropup.model.lm_loss``), the routing statistics in
``dropup.analysis.routing``."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dropup.analysis.routing import expert_counts

BALANCE_MODES = ("pooled", "per-layer", "global-batch")


def load_balancing_loss(
    router_logits: list[torch.Tensor],
    top_k: int,
    num_experts: int,
    mode: str = "pooled",
    mask: torch.Tensor | None = None,
    token_fractions: torch.Tensor | None = None,
    biases: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss E * sum_i f_i * P_i.

    f_i: top-k assignments to expert i per token (sums to top_k over experts); P_i: mean router
    probability of expert i. Gradients flow through P only.

    mode "pooled": f and P over all layers' tokens of the micro-batch together -- what
    transformers' Mixtral ``load_balancing_loss_func`` (and the paper's framework) computes; it
    only balances the layers on average. mode "per-layer": the loss of each layer on its own,
    averaged over layers. mode "global-batch": per layer, with f counted over the global batch
    rather than the micro-batch (Qwen's "global-batch load balancing", Qiu et al. 2025): a
    micro-batch may then be specialised as long as the whole batch is balanced. The caller passes
    those fractions as ``token_fractions`` ([layers, E]; see ``GlobalBatchCounts``); without them
    it is the per-layer loss. ``token_fractions`` in the other modes also replaces the local f.

    With aux-loss-free balancing on (``biases``, each layer's selection bias) f counts the experts
    the tokens are actually sent to, bias included, as Megatron-Core and torchtitan count them.
    """
    if not router_logits:
        return torch.zeros(())
    probs = torch.stack([r.float().softmax(dim=-1) for r in router_logits])  # [L, N, E]
    if mask is None:
        prob_sum = probs.sum(dim=1)
        tokens = torch.full((len(router_logits),), float(probs.shape[1]), device=probs.device)
    else:
        m = mask.reshape(1, -1, 1).to(probs)
        prob_sum = (probs * m).sum(dim=1)
        tokens = m.sum().expand(len(router_logits))
    if token_fractions is None:
        counts = expert_counts(router_logits, top_k, num_experts, mask, biases)
        token_fractions = counts / tokens[:, None]
    if mode == "pooled":
        f = (token_fractions * tokens[:, None]).sum(0) / tokens.sum()
        p = prob_sum.sum(0) / tokens.sum()
        return num_experts * (f * p).sum()
    if mode in ("per-layer", "global-batch"):
        p = prob_sum / tokens[:, None]
        return num_experts * (token_fractions * p).sum(-1).mean()
    raise ValueError(f"load-balancing mode must be one of {BALANCE_MODES}, got {mode!r}")


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    if not router_logits:
        return torch.zeros(())
    return torch.stack([torch.logsumexp(r.float(), dim=-1).pow(2).mean() for r in router_logits]).mean()


class GlobalBatchCounts:
    """Expert counts for the "global-batch" balance loss, summed over micro-batches and ranks.

    The gradient of a micro-batch's loss is taken before later micro-batches exist, so f for
    micro-batch m counts every rank's assignments in micro-batches 1..m of the step (a running
    buffer, as the global-batch paper suggests under gradient accumulation); the last micro-batch
    sees the whole global batch. Counting costs one small all-reduce per micro-batch and no host
    synchronisation.
    """

    def __init__(self, group=None):
        self.group = group
        self.counts: torch.Tensor | None = None

    def reset(self) -> None:
        self.counts = None

    def fractions(self, router_logits: list[torch.Tensor], top_k: int, num_experts: int,
                  biases: list[torch.Tensor] | None = None) -> torch.Tensor:
        counts = expert_counts(router_logits, top_k, num_experts, biases=biases)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(counts, group=self.group)
        self.counts = counts if self.counts is None else self.counts + counts
        # Normalised per token (not per assignment) like the local f: sums to top_k per layer.
        return self.counts * top_k / self.counts.sum(-1, keepdim=True)


def bias_step(loads: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing's update of the selection biases, [layers, E], from the loads of
    one optimizer step ([layers, E]: tokens sent to each expert, over every micro-batch and rank):
    ``rate * sign(mean load - load)``, the rule of DeepSeek-V3 (Liu et al. 2024, arXiv 2412.19437,
    after Wang et al. 2024, arXiv 2408.15664). An overloaded expert's bias falls and an idle one's
    rises by exactly ``rate`` (0 for an expert at the mean), so the bias only ever moves in steps
    of ``rate`` and the gradient never sees it."""
    mean = loads.mean(-1, keepdim=True)
    return torch.sign(mean - loads).to(torch.float32) * rate
