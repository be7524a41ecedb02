"""The optimizer side of the training recipe: AdamW (optionally with bf16 moments), weight decay
on matrices only, and the learning-rate schedule.

Storing AdamW's moment estimates in bf16 is the memory lever for large MoE models. With fp32
master weights, AdamW keeps 16 bytes per parameter (weight, gradient, two moments);
for the paper's 8x1.5B (8.96 B parameters) that is 143 GB, more than one H200 holds. Storing
the two moments in bf16 brings it to 12 bytes (107 GB). The update itself is computed in fp32
from the widened moments, one tensor at a time, so the only loss is the rounding of the stored
moments (bf16 optimizer states are a common memory-saving choice in large-scale training).
With ``state_dtype=torch.float32`` this is plain AdamW (decoupled weight decay, Loshchilov &
Hutter 2019) and matches ``torch.optim.AdamW``.

On CUDA the update of each tensor is one compiled elementwise kernel (``fused``): the eager form
is a dozen kernels per tensor, each a full pass over memory, which for the 8x1.5B's 9B parameters
cost about as much as a forward and backward at micro-batch 1. The compiled kernel reads the
weight, gradient and moments once and writes them once; it computes the same formula in fp32 but
may round differently from the eager sequence in the last bit (fused multiply-adds).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dropup.train.config import OptimSection


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 state_dtype: torch.dtype = torch.bfloat16, fused: bool | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.fused = fused  # None: on CUDA tensors only (compiling for the CPU costs more than it saves)
        # load_state_dict casts every floating state to its parameter's dtype (fp32): left so, a
        # resumed run would keep fp32 moments, use 4 more bytes per parameter and no longer round
        # them as the run before the checkpoint did.
        self.register_load_state_dict_post_hook(_restore_state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            hyper: dict[tuple, torch.Tensor] = {}  # the fused update's inputs, one copy per (step, device)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                t = state["step"].item()
                if self.fused if self.fused is not None else p.is_cuda:
                    # Hyper-parameters as a tensor, so a new learning rate is new data for the
                    # compiled kernel rather than a new constant to compile for.
                    if (t, p.device) not in hyper:
                        hyper[t, p.device] = torch.tensor([lr, b1, b2, eps, wd, 1 - b1**t, 1 - b2**t],
                                                          dtype=torch.float32).to(p.device)
                    # Elementwise, so each process updates its own FSDP2 shard (local tensors).
                    flat = [_local(x).view(-1) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                    _fused_update()(*flat, hyper[t, p.device])
                    continue
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(grad, grad, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                # Out of place: with float32 states, m and v are the stored tensors themselves.
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                if wd:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
                del grad, m, v, denom
        return loss


def _adamw_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  h: torch.Tensor) -> None:
    """AdamW.step's formula for one flattened tensor, in place; h = lr, b1, b2, eps, wd and the
    two bias corrections 1 - b1^t, 1 - b2^t."""
    lr, b1, b2, eps, wd, bc1, bc2 = h.unbind()
    g = grad.float()
    m = exp_avg.float().lerp(g, 1 - b1)
    v = exp_avg_sq.float() * b2 + (1 - b2) * g * g
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    update = m / ((v / bc2).sqrt() + eps) * (lr / bc1)
    p.copy_(p * (1 - lr * wd) - update)


_FUSED = None


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _fused_update():
    """``_adamw_update`` compiled once for every size (dynamic shapes), on first use."""
    global _FUSED
    if _FUSED is None:
        _FUSED = torch.compile(_adamw_update, dynamic=True, fullgraph=True)
    return _FUSED


def _restore_state_dtype(opt: AdamW) -> None:
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and state[key].dtype != opt.state_dtype:
                state[key] = state[key].to(opt.state_dtype)


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_steps``,
    then cosine decay reaching ``min_lr`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and stacked experts); none on norms and biases (1-D tensors),
    whose scale is not what over-fits and which decay would pull towards zero."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_settings(optimizer: torch.optim.Optimizer, o: OptimSection) -> None:
    """Set the config's AdamW hyperparameters on a resumed optimizer: loading a checkpoint
    restores the ones it was saved with, which would silently override a changed config."""
    for i, group in enumerate(optimizer.param_groups):
        group["betas"], group["eps"] = tuple(o.betas), o.eps
        group["weight_decay"] = o.weight_decay if i == 0 else 0.0  # the groups of param_groups


def build_optimizer(model: torch.nn.Module, o: OptimSection, lr: float, device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, o.weight_decay)
    if o.state_dtype == "bfloat16":  # 12 instead of 16 bytes per parameter (see AdamW above)
        return AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, state_dtype=torch.bfloat16)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=device_type == "cuda")
