"""The language-model loss: next-token cross entropy, and the same computed from the final hidden
states chunk by chunk so the [tokens, vocab] logits never exist at once."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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
        grad_w = None  # fp32 [V, d], from the first chunk's product on
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = _chunk_step(h.device)
        for start in range(0, h.shape[0], chunk):
            hc = h[start:start + chunk]
            loss, g = step(hc, w, safe[start:start + chunk], valid[start:start + chunk], want_grad)
            total += loss
            if want_grad:
                torch.mm(g, w, out=grad_h[start:start + chunk])
                grad_w = _add_product(grad_w, g.t(), hc)
        if want_grad and grad_w is None:  # no rows at all
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
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
    # The one-hot as a comparison, not a scatter into the softmax: compiled, the whole gradient
    # is then one elementwise pass that reads the bf16 logits and writes the bf16 gradient. A
    # scatter makes the fp32 softmax a buffer of its own, written and read once more (on the
    # H200 that was most of the chunk's non-matmul time).
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    g = (logits - lse[:, None]).exp() - onehot.float()
    return loss, (g * valid[:, None]).to(hc.dtype)


def _add_product(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in fp32 (``acc`` None: ``a @ b``). On CUDA a low-precision product is
    accumulated in the GEMM itself (``out_dtype``): no rounded [V, d] product in between, and no
    separate pass to add it. Elsewhere (that overload is CUDA-only) the product is widened and added."""
    if a.is_cuda and a.dtype != torch.float32:
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    prod = (a @ b).float()
    return prod if acc is None else acc.add_(prod)


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


# Scoring held-out text: `dropup eval` and training's validation share these, so their numbers agree.


def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum) of the next-token NLL of ``batch`` [b, seq + 1] (fp32 tensors; every target
    scored), the LM head chunked so the batch's full-vocabulary logits never exist at once."""
    mean = model(batch[:, :-1], targets=batch[:, 1:]).float()
    return mean, mean * batch[:, 1:].numel()


def target_bytes(table: torch.Tensor | np.ndarray | None, batch: torch.Tensor) -> int | None:
    """UTF-8 bytes of ``batch``'s targets (all but each window's first token); None without a table."""
    if table is None:
        return None
    table = torch.as_tensor(table)
    return int(table[batch[:, 1:].to(table.device)].sum())


def bits_per_byte(nll_sum: float, n_bytes: int | None) -> float | None:
    if not n_bytes:
        return None
    return nll_sum / (math.log(2) * n_bytes)
