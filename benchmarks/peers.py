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

OLMo-core (AllenAI's OLMo/OLMoE trainer), release 3.0.0: the newest on PyPI and one that allows
torch 2.11 (it requires torch >= 2.10, < 2.14). Its ``TransformerConfig.llama_like`` model classes,
configured Llama/Mixtral-style (pre-norm blocks, RMSNorm eps 1e-5, RoPE theta 10000, no QK-norm, no
biases, untied embeddings, SDPA attention, SwiGLU of width d_f); the dense twins are its
``Transformer``, the MoE models its ``MoETransformer`` with its dropless MoE (the one its OLMoE
configurations use): softmax router, top-2, weights renormalised (``normalize_expert_weights=1``),
load-balancing loss weight 0.02 divided among the layers (its default), no z-loss. Its balancing
loss is sum_i f_i P_i per layer, 1/E of the Switch/Mixtral E * sum_i f_i P_i that dropup uses, so
at the same weight it pulls 8 times less. OLMo-core 3.0.0's newer fused MoE ("moe_fused_v2",
``torch.nn.functional.grouped_mm`` experts) was not used: its token permutation calls
TransformerEngine (``moe_permute``), whose PyTorch extension is built from source against the
installed torch and is not on the GPU machine. The dropless MoE's expert matmuls use the
``grouped_gemm`` CUDA extension when it is installed and otherwise OLMo-core's own fallback, one
matmul per expert (it warns it is "substantially slower"; the row then says so, ``caveat``); its
token gather and scatter are Triton kernels, so it runs on CUDA only. ``grouped_gemm`` (0.3.0) has
no wheel; benchmarks/peers_on_device.sh builds it on the GPU machine with
``GROUPED_GEMM_CUTLASS=1``, the backend that takes the per-expert counts as a GPU tensor, as
OLMo-core passes them (the default cuBLAS backend refuses them). Compiled with its own
``apply_compile`` (each block and the LM head, not fullgraph; the MoE's permutation and expert
matmuls stay outside torch.compile by its design). The loss is its LM head's own (summed CE over
the tokens, as its train module calls it); the router's load-balancing losses reach the gradient
through its autograd hook, and their value is added to the returned loss. ``pre_step`` is its train
module's per-batch bookkeeping (``post_batch``, then the router metrics computed and reset).

Each builder returns ``(model, step_fn, pre_step)``: ``step_fn(x, y)`` gives the loss and
``pre_step()`` (or None) runs before ``optimizer.step()``.
"""

from __future__ import annotations

import importlib.metadata

import torch

E, K = 8, 2


def _versions(dists) -> dict:
    out = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def peer_versions() -> dict:
    return _versions(PEERS)


# Compiled extensions a peer's fastest path needs; recorded with the versions of a run.
EXTENSIONS = ("grouped_gemm",)


def extension_versions() -> dict:
    return _versions(EXTENSIONS)


def caveat(dist: str, moe: bool) -> str:
    """What the table must say beside a peer's row when it did not run its fastest path."""
    if dist == "ai2-olmo-core" and moe and "grouped_gemm" not in extension_versions():
        return "; no grouped_gemm: its per-expert fallback"
    return ""


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


def olmo_core_model(shape: tuple, seq: int, device, compiled: bool):
    from olmo_core.nn.attention import AttentionBackendName
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.moe import MoEConfig, MoERouterConfig, MoEType
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig, TransformerType

    moe, layers, h, d_f, heads, kv, vocab, _ = shape
    if moe:
        # normalize_expert_weights=1.0 divides the top-k softmax weights by their L1 norm: Mixtral's
        # renormalised top-2. The load-balancing weight is shared out among the layers (its
        # default scale_loss_by_num_layers), so the total is 0.02 times the layers' mean, as in
        # dropup. OLMo-core's router adds its aux losses to the gradient only (an autograd hook
        # on the routed activations), not to the returned loss.
        block = dict(name=TransformerType.moe, block_name=TransformerBlockType.moe,
                     feed_forward_moe=MoEConfig(
                         name=MoEType.dropless, num_experts=E, hidden_size=d_f,
                         router=MoERouterConfig(top_k=K, normalize_expert_weights=1.0),
                         lb_loss_weight=0.02, z_loss_weight=None))
    else:
        block = dict(feed_forward=FeedForwardConfig(hidden_size=d_f, bias=False))
    config = TransformerConfig.llama_like(
        d_model=h, vocab_size=vocab, n_layers=layers, n_heads=heads, n_kv_heads=kv,
        layer_norm_eps=1e-5, rope_theta=10000, qk_norm=False, attn_backend=AttentionBackendName.torch,
        **block)
    torch.manual_seed(0)
    model = config.build(init_device="meta")  # its trainer's construction: meta, then init
    model.init_weights(device=device, max_seq_len=seq)
    model.train()
    if compiled:
        model.apply_compile()

    routers = [b.feed_forward_moe.router for b in model.blocks.values() if b.is_moe]

    def step(x, y):
        # As its train module calls it: summed CE divided by the tokens, through the LM head's loss.
        out = model(x, labels=y, loss_reduction="sum", loss_div_factor=y.numel())
        # The weighted load-balancing losses this step accumulated, for the value only (their
        # gradient already flows through OLMo-core's hook).
        aux = sum(r.lb_loss_weight * r.load_balancing_loss for r in routers)
        return out.loss + aux

    def pre_step():  # its train module's per-batch bookkeeping before the optimizer step
        model.post_batch()
        model.compute_auxiliary_metrics(reset=True)

    return model, step, pre_step if routers else None


# distribution name -> builder, in the order of the table's rows
PEERS = {"torchtitan": torchtitan_model, "ai2-olmo-core": olmo_core_model}


def installed(names) -> list[tuple[str, str, object]]:
    """(distribution, version, builder) of each peer that is installed and whose label is in
    ``names``, in PEERS order."""
    versions = peer_versions()
    return [(dist, versions[dist], build) for dist, build in PEERS.items()
            if dist in versions and label(dist) in names]


def label(dist: str) -> str:
    """A peer's name in the table: its distribution's name, less the "ai2-" of OLMo-core's."""
    return dist.removeprefix("ai2-")
