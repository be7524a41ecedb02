"""Training losses: next-token cross entropy and the router losses of MoE layers, plus the
router diagnostics the trainer logs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

BALANCE_MODES = ("pooled", "per-layer", "global-batch")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy in fp32; ``targets`` are already shifted ([batch, seq])."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


class _LMHeadCrossEntropy(torch.autograd.Function):
    """Cross entropy of ``hidden @ weight.T`` without ever holding the [N, vocab] logits.

    Rows are processed in chunks; each chunk's softmax gradient is formed right away and turned
    into the gradients of hidden and weight, so peak memory is one chunk of fp32 logits instead
    of all of them (8 x 4096 tokens at vocabulary 99,584 would be 13 GB). This is the idea of
    fused linear cross-entropy kernels (e.g. Liger-Kernel's, Hsu et al. 2024), here in plain
    PyTorch: the matmuls dominate and run as ordinary GEMMs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int, dtype: torch.dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        count = valid.sum().clamp_min(1).float()
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = _chunk_step(h.device)
        for start in range(0, h.shape[0], chunk):
            hc = h[start:start + chunk]
            loss, g = step(hc, w, safe[start:start + chunk], valid[start:start + chunk], want_grad)
            total += loss
            if want_grad:
                grad_h[start:start + chunk] = g @ w
                grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        dh = (grad_h * scale).to(ctx.dtypes[0]) if grad_h is not None else None
        dw = (grad_w * scale).to(ctx.dtypes[1]) if grad_w is not None else None
        return dh, dw, None, None, None, None


def _ce_chunk(hc, w, targets, valid, want_grad: bool):
    """Summed loss of one chunk and, when wanted, d(loss)/d(logits) = softmax - onehot (masked),
    in the matmul dtype. The fp32 logits live only inside this function."""
    logits = (hc @ w.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, targets[:, None]).squeeze(1)) * valid).sum()
    if not want_grad:
        return loss, None
    g = (logits - lse[:, None]).exp()
    g = g.scatter_add(1, targets[:, None], -torch.ones_like(g[:, :1]))
    return loss, (g * valid[:, None]).to(hc.dtype)


_COMPILED_CE_CHUNK = None


def _chunk_step(device: torch.device):
    """On CUDA the chunk's element-wise passes over [chunk, vocab] fp32 are memory-bound; compiled
    they fuse into a couple of kernels. Elsewhere the eager function (no compiler needed)."""
    global _COMPILED_CE_CHUNK
    if device.type != "cuda":
        return _ce_chunk
    if _COMPILED_CE_CHUNK is None:
        _COMPILED_CE_CHUNK = torch.compile(_ce_chunk, dynamic=False)
    return _COMPILED_CE_CHUNK


def lm_head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean next-token cross entropy of ``hidden [..., d] @ weight[V, d].T`` against ``targets``,
    chunked over rows (see ``_LMHeadCrossEntropy``). Under autocast the matmuls run in the
    autocast dtype, softmax and sums in fp32, as with ``cross_entropy(F.linear(...))``."""
    dtype = (torch.get_autocast_dtype(hidden.device.type)
             if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LMHeadCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                         targets.reshape(-1), chunk, ignore_index, dtype)


def expert_counts(
    router_logits: list[torch.Tensor], top_k: int, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-k assignments per expert, [layers, E] (fp32, no gradient), optionally only where
    ``mask`` (flattened like the router logits' rows) is nonzero.

    Summed over micro-batches and all-reduced over ranks this is what a global-batch balance
    loss needs; pass the normalised result to ``load_balancing_loss(token_fractions=...)``.
    """
    rows = []
    for logits in router_logits:
        ids = logits.detach().float().softmax(dim=-1).topk(top_k, dim=-1).indices
        w = torch.ones_like(ids, dtype=torch.float32)
        if mask is not None:
            w = w * mask.reshape(-1, 1).to(w)
        rows.append(torch.zeros(num_experts, device=logits.device).scatter_add_(0, ids.reshape(-1), w.reshape(-1)))
    return torch.stack(rows)


def load_balancing_loss(
    router_logits: list[torch.Tensor],
    top_k: int,
    num_experts: int,
    mode: str = "pooled",
    mask: torch.Tensor | None = None,
    token_fractions: torch.Tensor | None = None,
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
        counts = expert_counts(router_logits, top_k, num_experts, mask)
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


def _token_entropy(router_logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each token's routing distribution, [N]."""
    logp = router_logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def router_metrics(router_logits: list[torch.Tensor], top_k: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-layer diagnostics for logging: load fractions [L, E] (sum to 1), max/min load ratio
    [L] (inf when an expert got nothing) and mean router entropy in nats [L]."""
    with torch.no_grad():
        counts = expert_counts(router_logits, top_k, num_experts)
        load = counts / counts.sum(-1, keepdim=True)
        ratio = load.max(-1).values / load.min(-1).values
        entropy = torch.stack(
            [_token_entropy(r).mean() for r in router_logits]
        )
    return {"load": load, "max_min_ratio": ratio, "entropy": entropy}


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

    def fractions(self, router_logits: list[torch.Tensor], top_k: int, num_experts: int) -> torch.Tensor:
        counts = expert_counts(router_logits, top_k, num_experts)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(counts, group=self.group)
        self.counts = counts if self.counts is None else self.counts + counts
        # Normalised per token (not per assignment) like the local f: sums to top_k per layer.
        return self.counts * top_k / self.counts.sum(-1, keepdim=True)


class RouterStats:
    """Accumulates per-layer routing statistics over the micro-batches of a log interval."""

    def __init__(self):
        self.counts: torch.Tensor | None = None
        self.entropy_sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, router_logits: list[torch.Tensor], top_k: int, num_experts: int) -> None:
        with torch.no_grad():
            counts = expert_counts(router_logits, top_k, num_experts)
            ent = torch.stack([_token_entropy(r).sum() for r in router_logits])
        self.counts = counts if self.counts is None else self.counts + counts
        self.entropy_sum = ent if self.entropy_sum is None else self.entropy_sum + ent
        self.tokens += router_logits[0].shape[0]

    def reduce(self, group=None) -> dict[str, list] | None:
        """Load fractions [L][E], max/min load ratio [L] (None when an expert got no token) and
        mean router entropy in nats [L], over all ranks. Collective: every rank must call it."""
        if self.counts is None:
            return None
        buf = torch.cat([self.counts.flatten(), self.entropy_sum,
                         torch.tensor([float(self.tokens)], device=self.counts.device)])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(buf, group=group)
        n_layers, e = self.counts.shape
        counts = buf[: n_layers * e].view(n_layers, e)
        entropy = buf[n_layers * e : n_layers * e + n_layers] / buf[-1]
        load = counts / counts.sum(-1, keepdim=True)
        ratio = load.max(-1).values / load.min(-1).values
        return {
            "router_load": [[round(x, 5) for x in row] for row in load.tolist()],
            "router_max_min_ratio": [round(x, 4) if x != float("inf") else None for x in ratio.tolist()],
            "router_entropy": [round(x, 5) for x in entropy.tolist()],
        }
