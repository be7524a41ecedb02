"""The peers of train_bench.py (issue 16), each built from its own model code.

torchtitan (PyTorch's training platform): its Qwen3 model classes, which carry torchtitan's MoE
(token-choice top-k router, grouped-GEMM experts through ``torch._grouped_mm``) and, for the dense
twins, its dense FFN. Configured to the benchmark's shapes with Mixtral's routing (softmax over all
experts, top-2, weights renormalised and applied after the experts: torchtitan's own Qwen3-MoE
settings), no QK-norm (the shapes are Llama/Mixtral ones), and compiled the way torchtitan's own
trainer compiles it (``apply_compile``: each block, fullgraph, plus the grouped-GEMM function).
Its loss is its own ``cross_entropy_loss`` (sum, divided by the tokens). torchtitan has no
load-balancing loss; it balances with per-expert selection biases (aux-loss-free, its default
``load_balance_coeff`` 1e-3), updated before each optimizer step as its
``build_optimizers_with_moe_load_balancing`` hook does, so that bookkeeping is timed too.

Each builder returns ``(model, step_fn, pre_step)``: ``step_fn(x, y)`` gives the loss and
``pre_step()`` (or None) runs before ``optimizer.step()``.
"""

from __future__ import annotations

import importlib.metadata

import torch

E, K = 8, 2


def peer_versions() -> dict:
    out = {}
    for dist in ("torchtitan", "ai2-olmo-core"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def torchtitan_model(shape: tuple, seq: int, device, compiled: bool):
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama4.infra.parallelize import apply_compile
    from torchtitan.models.moe import MoEArgs
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs
    from torchtitan.models.qwen3.model.model import Qwen3Model

    moe, layers, h, d_f, heads, kv, vocab, _ = shape
    args = Qwen3ModelArgs(
        dim=h, n_layers=layers, n_heads=heads, n_kv_heads=kv, vocab_size=vocab, head_dim=h // heads,
        hidden_dim=d_f, norm_eps=1e-5, rope_theta=10000.0, qk_norm=False, max_seq_len=seq,
        attn_type="sdpa", enable_weight_tying=False, moe_enabled=moe, moe_inter_dim=d_f,
        moe_args=MoEArgs(num_experts=E, num_shared_experts=0, top_k=K, score_func="softmax",
                         route_norm=True, route_scale=1.0, score_before_experts=False,
                         use_grouped_mm=True, load_balance_coeff=1e-3),
    )
    torch.manual_seed(0)
    with torch.device("meta"):  # torchtitan's own construction: meta, then materialise and init
        model = Qwen3Model(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    if compiled:
        apply_compile(model, Compile(enable=True), ep_enabled=False)

    def step(x, y):
        return cross_entropy_loss(model(x), y) / y.numel()

    moes = [b.moe for b in model.layers.values() if b.moe_enabled]

    @torch.no_grad()
    def pre_step():  # the aux-loss-free bias update of torchtitan's optimizer hook
        for m in moes:
            counts = m.tokens_per_expert.float()
            delta = m.load_balance_coeff * torch.sign(counts.mean() - counts)
            m.expert_bias.add_(delta - delta.mean())
            m.tokens_per_expert.zero_()

    return model, step, pre_step if moes else None
