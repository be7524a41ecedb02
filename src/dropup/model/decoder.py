"""The training engine's model: one plain PyTorch Llama-family decoder with a dense or MoE FFN.

It covers the architectures the converter reads and writes -- dense ``llama``, ``mistral``,
``qwen2``, ``qwen3``, ``granite`` and MoE ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``granitemoe``
(Granite's four scalars are config fields that are neutral elsewhere). The config lives in
``dropup.hub.config``, checkpoint I/O in ``dropup.model.io``, the LM loss in
``dropup.model.lm_loss``, the router losses in ``dropup.train.losses``.

Reading order: ``RMSNorm``, ``RotaryEmbedding``, ``Attention``, ``FeedForward``, ``MoE``,
``DecoderLayer``, ``CausalLM``.

    logits = model(input_ids)                                     # [batch, seq, vocab]
    logits, router_logits = model(input_ids, return_router_logits=True)
    # router_logits: one fp32 tensor [batch * seq, num_experts] per MoE layer, in layer order

Inside the model the experts of a layer are stacked into three parameters ``[E, out, in]`` so that
one grouped GEMM serves all experts; only the checkpoint I/O knows the per-expert Hub names.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dropup.hub.config import ModelConfig
from dropup.model.lm_loss import lm_head_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise and scale in fp32 (a bf16 mean of squares loses too much), round once to the
        # input's dtype. transformers rounds before scaling too; a compiled layer skips that
        # rounding, so rounding once is what keeps eager and compiled runs in agreement.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin multiplier for the config's RoPE type.

    ``seq_len`` only matters for "dynamic" (NTK-aware) scaling, which raises the base once the
    sequence is longer than ``max_position_embeddings``.
    """
    dim, base = cfg.head_dim, cfg.rope_theta
    p = cfg.rope_scaling or {}
    kind = p.get("rope_type", "default")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scale = 1.0
    if kind == "dynamic":
        n, factor = max(seq_len or 0, cfg.max_position_embeddings), p["factor"]
        base = base * ((factor * n / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        inv_freq = inv_freq / p["factor"]
    elif kind == "llama3":
        # Wavelengths longer than old_len / low_freq_factor are slowed down by `factor`, those
        # shorter than old_len / high_freq_factor are kept, and the band between is blended.
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        keep = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - keep) * inv_freq / factor + keep * inv_freq
    elif kind == "yarn":
        old_len = p["original_max_position_embeddings"]
        factor = p.get("factor") or cfg.max_position_embeddings / old_len

        def mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        scale = p.get("attention_factor")
        if scale is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                scale = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            else:
                scale = mscale(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times in old_len
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        # Dimensions that rotate often keep their frequency (extrapolate), slow ones are interpolated.
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, float(scale)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.scale = rope_inv_freq(cfg)
        # Not persistent: HF checkpoints do not store it, and it is recomputed after meta-init.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dynamic = (cfg.rope_scaling or {}).get("rope_type") == "dynamic"

    def reset(self) -> None:
        inv_freq, self.scale = rope_inv_freq(self.cfg)
        self.inv_freq = inv_freq.to(self.inv_freq.device, torch.float32)

    def forward(self, position_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [batch or 1, seq, head_dim], in fp32."""
        if self.inv_freq.dtype != torch.float32:  # model.to(bf16) cast the buffer: recompute it
            self.reset()
        inv_freq = self.inv_freq
        if self.dynamic and seq_len > self.cfg.max_position_embeddings:
            inv_freq = rope_inv_freq(self.cfg, seq_len)[0].to(inv_freq.device)
        angles = position_ids[..., None].float() * inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [batch, heads, seq, head_dim]; HF's layout pairs dimension i with i + head_dim / 2.
    # Everything in fp32 (cos/sin too, which transformers rounds to x's dtype first), rounded once
    # at the end. A torch.compile'd layer drops roundings that are undone within one fused kernel,
    # so this is what it computes anyway: eager and compiled bf16 runs agree, and it is the more
    # accurate of the two.
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.o_bias)
        self.scale = cfg.attention_multiplier  # None: SDPA's 1 / sqrt(head_dim)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:  # qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is None:
            # Plain causal: lets SDPA pick flash attention, which handles GQA without copying k/v.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                 enable_gqa=self.n_kv != self.n_heads)
        else:
            # With an explicit mask flash is out and the other kernels want equal head counts.
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up formed in fp32 and rounded once to the inputs' dtype (see apply_rope)."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate/up [E, d_f, d_h], down [E, d_h, d_f] (nn.Linear layout)."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))


# How an MoE layer runs its experts: "auto" (grouped on CUDA in bf16, loop elsewhere),
# "grouped" (torch._grouped_mm; also runs on CPU in recent torch), "loop" (one matmul per expert).
MOE_IMPLS = ("auto", "grouped", "loop")


def select_experts(probs: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """The experts each token goes to, [N, k], best first: the top-k of the router probabilities
    [N, E] plus the per-expert selection bias [E] (aux-loss-free balancing, DeepSeek-V3, Liu et al.
    2024, after Wang et al. 2024; the probabilities are this architecture's affinity scores).
    A zero bias leaves the probabilities bit for bit, so the choice is the plain top-k.

    k rounds of argmax rather than ``topk``: ties go to the lowest expert index (argmax's
    documented rule; topk leaves the order of ties unspecified, and copied experts tie exactly),
    and in a compiled layer the rounds fuse into the routing's own kernel where topk was a
    kernel of its own per layer and pass."""
    scores = probs if bias is None else probs + bias
    ids = []
    for _ in range(k):
        best = scores.argmax(dim=-1, keepdim=True)
        ids.append(best)
        scores = scores.scatter(-1, best, float("-inf"))
    return torch.cat(ids, dim=-1)


class MoE(nn.Module):
    """Dropless token-choice top-k MoE with an fp32 router (Mixtral / Qwen-MoE semantics)."""

    skip_top_ranks: int = 0  # see route(); set per instance by analysis code, never in training

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = FeedForward(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.impl = "auto"
        self.router_logits: torch.Tensor | None = None
        # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias on the scores that decides the
        # top-k choice only. A buffer, not a parameter: no gradient, no weight decay, not in the
        # optimizer; the trainer updates it after each step (dropup.train.losses.bias_step).
        # Not persistent: Mixtral / Qwen-MoE checkpoints have no slot for it, so it travels in a
        # file beside the weights (dropup.model.io.ROUTER_BIAS_FILE). Zero is the plain routing.
        self.register_buffer("selection_bias", torch.zeros(cfg.num_experts), persistent=False)

    def take_router_logits(self) -> torch.Tensor:
        """The router logits of the last forward, handed over once (no reference stays behind)."""
        logits, self.router_logits = self.router_logits, None
        return logits

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E] (fp32), top-k weights [N, k] (fp32) and expert ids [N, k]."""
        # fp32 even under bf16 autocast: near-ties in bf16 flip the top-k choice between steps.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        ids = select_experts(probs, self.selection_bias, self.top_k + self.skip_top_ranks)
        if self.skip_top_ranks:
            # Redundancy analysis only (analysis/diversity.py): each token's first-ranked experts
            # are removed and the next-best take their place, weighted as the architecture weights
            # a top-k choice. Training never sets it, so its compiled graph sees the constant 0.
            ids = ids[:, self.skip_top_ranks :]
        # The weights are the chosen experts' own probabilities: the bias decides which experts a
        # token goes to, never how much each one counts.
        weights = probs.gather(-1, ids)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, ids

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        """The layer's output. Its router logits [N, E] are kept in ``self.router_logits`` until
        the model collects them (``take_router_logits``) for the losses and statistics; with
        ``return_logits`` they are returned beside the output instead, and nothing is stored."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        out = self.run_experts(x, weights, ids)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x).float())
            out = (out.float() + gate * self.shared_expert(x).float()).to(x.dtype)
        if return_logits:
            return out.reshape(shape), logits
        # An attribute rather than a second return value or an argument to append to: a list or
        # recorder argument is rebuilt by FSDP2's input casting and guarded on by torch.compile
        # (its length differs per layer, so every layer would compile its own graph), while an
        # attribute store is a side effect the one shared graph replays.
        self.router_logits = logits
        return out.reshape(shape)

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n, k, e = x.shape[0], self.top_k, self.num_experts
        # Sort the N*k (token, expert) assignments by expert so each expert sees a contiguous block.
        # Everything here stays on the device: no .item(), no bincount (it syncs to size its output).
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        # inverse[i]: where assignment i (token i // k, slot i % k) sits in expert order.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.zeros(e, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        xs = gather_rows(x, order // k, inverse, k)

        dtype = _compute_dtype(x, self.experts.gate_proj)
        impl = self.impl
        if impl == "auto":
            impl = "grouped" if x.is_cuda and dtype == torch.bfloat16 else "loop"
        w = self.experts
        if impl == "grouped":
            # _grouped_mm ignores autocast, so cast inputs and weights to the compute dtype here.
            offs = counts.cumsum(0).to(torch.int32)
            xs = xs.to(dtype)
            gate = _grouped_mm(xs, w.gate_proj.to(dtype), offs)
            up = _grouped_mm(xs, w.up_proj.to(dtype), offs)
            ys = _grouped_mm(swiglu(gate, up), w.down_proj.to(dtype), offs)
        else:
            # Reference path: one matmul per expert. counts.tolist() syncs, fine off the hot path.
            outs = []
            for i, c in enumerate(xs.to(dtype).split(counts.tolist())):
                h = swiglu(F.linear(c, w.gate_proj[i].to(dtype)), F.linear(c, w.up_proj[i].to(dtype)))
                outs.append(F.linear(h, w.down_proj[i].to(dtype)))
            ys = torch.cat(outs)
        # Back to (token, slot) order, weight in fp32, sum the k slots. The sum is returned in the
        # input's dtype (fp32 under autocast, where the residual stream is fp32): rounding it to
        # bf16 only to add it to an fp32 residual is a rounding a compiled layer would skip.
        ys = gather_rows(ys, inverse, order, 1).view(n, k, -1)
        out = (ys.float() * weights[..., None]).sum(dim=1)
        return out.to(x.dtype)


class _GatherRows(torch.autograd.Function):
    """``src[index]`` where every row of ``src`` is taken exactly ``repeats`` times, and
    ``back[j]`` lists, in ``src`` row order, where those copies went (row r's copies are
    ``back[r * repeats : (r + 1) * repeats]``). The backward is then a gather and a sum too.

    Autograd's own backward of ``src[index]`` is a scatter-add (index_put with accumulate):
    atomic adds on CUDA, so the routing's gradients were not deterministic there, and a
    zero-filled buffer besides. Knowing the routing is a permutation (or k copies of each
    token) turns it into a gather, which is deterministic everywhere.
    """

    @staticmethod
    def forward(ctx, src, index, back, repeats: int):
        ctx.save_for_backward(back)
        ctx.repeats = repeats
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        g = grad.index_select(0, back)
        if ctx.repeats > 1:  # summed in the gradient's dtype: fp32 for the fp32 residual stream
            g = g.view(-1, ctx.repeats, grad.shape[-1]).sum(dim=1)
        return g, None, None, None


def gather_rows(src: torch.Tensor, index: torch.Tensor, back: torch.Tensor, repeats: int) -> torch.Tensor:
    """``src[index]`` with a gather for its backward (see ``_GatherRows``)."""
    return _GatherRows.apply(src, index, back, repeats)


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE blocks in layer order: the order of its router logits."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def selection_biases(model: nn.Module) -> list[torch.Tensor]:
    """Each MoE layer's selection bias buffer [E], in layer order (updated in place by training)."""
    return [m.selection_bias for m in moe_layers(model)]


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x in group g (rows offs[g-1]:offs[g]) times w[g].T; w is [E, out, in]."""
    # Passing the transpose of the contiguous [E, out, in] weight gives the column-major right
    # operand the CUDA kernel wants, with no copy.
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


# Activation checkpointing of a decoder layer: "none" keeps every activation for the backward;
# "full" keeps only the layer's input and recomputes the whole layer in the backward; "selective"
# keeps the outputs of the matmuls and attention and recomputes the rest (see _selective_policy).
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")

# Selective activation checkpointing (Korthikanti et al. 2022, "Reducing Activation Recomputation
# in Large Transformer Models"; PyTorch's op-level SAC): the ops whose outputs are kept. They are
# the layer's FLOPs, so recomputing everything else costs little time, and what is recomputed --
# norms, RoPE, SwiGLU, the routing arithmetic, dtype casts -- holds many fp32 intermediates.
# getattr: an op this torch build lacks cannot occur either.
_SAVED_OPS = frozenset(op for op in (getattr(torch.ops.aten, name, None) for name in (
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable")) if op is not None)


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # MUST_SAVE: torch.compile's partitioner may not trade a saved matmul for a recomputation.
    saved = getattr(op, "overloadpacket", None) in _SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.sliding_window = cfg.sliding_windows[i]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(i)
        self.mlp = MoE(cfg) if self.is_moe else FeedForward(cfg.hidden_size, cfg.intermediate_size)
        self.residual_multiplier = cfg.residual_multiplier  # Granite scales each branch
        self.checkpointing = "none"  # one of ACTIVATION_CHECKPOINTING; CausalLM.set_activation_checkpointing

    def forward(self, x, cos, sin, mask):
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            x, logits = self._block(x, cos, sin, mask)
        else:
            # Inside the layer's forward, so inside its compiled region (compile_layers) and inside
            # FSDP2's per-layer all-gather; non-reentrant, the kind both of them support.
            # The policy's partial is built here: torch.compile takes a context_fn only as a
            # partial it sees being made (or a plain function), not as a global object.
            extra = {}
            if self.checkpointing == "selective":
                extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
            # preserve_rng_state off: the layer draws no random numbers, so stashing and restoring
            # every device's RNG state per layer would be work for nothing.
            x, logits = checkpoint(self._block, x, cos, sin, mask, use_reentrant=False, preserve_rng_state=False,
                                   **extra)
        if logits is not None:
            # Stored here, outside the checkpointed block: its recomputation in the backward runs
            # _block alone, so nothing is recorded twice and no recomputed tensor (with the graph
            # behind it) stays referenced after the backward.
            self.mlp.router_logits = logits
        return x

    def _block(self, x, cos, sin, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output and, for an MoE layer, its router logits; no side effects."""
        x = self._residual(x, self.self_attn(self.input_layernorm(x), cos, sin, mask))
        h = self.post_attention_layernorm(x)
        out, logits = self.mlp(h, return_logits=True) if self.is_moe else (self.mlp(h), None)
        return self._residual(x, out), logits

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return x + branch if self.residual_multiplier == 1.0 else x + branch * self.residual_multiplier


class Backbone(nn.Module):
    """Named like HF's `model` submodule so that parameter names match the checkpoint's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class CausalLM(nn.Module):
    """The decoder plus LM head. ``model(input_ids)`` -> logits [batch, seq, vocab].

    ``model(input_ids, return_router_logits=True)`` -> ``(logits, router_logits)`` where
    ``router_logits`` is a list with one fp32 ``[batch * seq, num_experts]`` tensor per MoE layer
    (empty for dense models): the input of ``load_balancing_loss`` and ``router_z_loss``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Backbone(cfg)
        # Tied embeddings: no lm_head module at all, so there is one tensor to shard and save.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        return_router_logits: bool = False,
        targets: torch.Tensor | None = None,
    ):
        """Logits, or with ``targets`` the mean cross entropy computed chunk by chunk from the
        final hidden states (the [batch, seq, vocab] logits are never materialised)."""
        x, router_logits = self.hidden_states(input_ids, position_ids)
        if self.config.logits_scaling != 1.0:  # Granite divides the logits; dividing x is the same map
            x = x / self.config.logits_scaling
        if targets is not None:
            out = lm_head_cross_entropy(x, self.output_weight, targets)
        else:
            out = F.linear(x, self.output_weight)
        return (out, router_logits) if return_router_logits else out

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """Final-norm hidden states [batch, seq, d] and the router logits of the MoE layers."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)[None]
        cos, sin = self.model.rotary_emb(position_ids, t)
        windows = {layer.sliding_window for layer in self.model.layers}
        masks = {w: _sliding_mask(t, w, input_ids.device) for w in windows}
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:  # Granite
            x = x * self.config.embedding_multiplier
        for layer in self.model.layers:
            x = layer(x, cos, sin, masks[layer.sliding_window])
        router_logits = [layer.mlp.take_router_logits() for layer in self.model.layers if layer.is_moe]
        return self.model.norm(x), router_logits

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compile_layers(self, **kwargs) -> None:
        """torch.compile each decoder layer on its own (regional compilation): the layers share
        one compiled graph, compile time does not grow with depth, and FSDP2's per-layer hooks
        stay outside the graphs. Fuses the norms, RoPE, SwiGLU and the routing arithmetic."""
        for layer in self.model.layers:
            layer.compile(**kwargs)

    def set_activation_checkpointing(self, mode: str, every: int = 1) -> None:
        """Activation checkpointing (one of ACTIVATION_CHECKPOINTING) on every ``every``-th decoder
        layer, counting from layer 0 (layers 0, every, 2 * every, ...); the others keep their
        activations. Memory for recomputation: "full" recomputes a checkpointed layer's forward
        in its backward (about a third more compute for that layer), "selective" only its
        elementwise and norm ops. Gradients are unchanged. Call it before ``compile_layers``
        or between steps; "none" is the plain layer."""
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"activation checkpointing every must be an integer >= 1, got {every!r}")
        for i, layer in enumerate(self.model.layers):
            layer.checkpointing = mode if i % every == 0 else "none"

    def set_moe_impl(self, impl: str) -> None:
        """Choose how MoE layers run their experts: one of MOE_IMPLS."""
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe impl must be one of {MOE_IMPLS}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, MoE):
                m.impl = impl

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """From-scratch initialisation: every matrix N(0, std^2), norms 1, biases 0."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

def _sliding_mask(t: int, window: int | None, device) -> torch.Tensor | None:
    # A window at least as long as the sequence is plain causal attention: keep the fast path.
    if window is None or window >= t:
        return None
    i = torch.arange(t, device=device)
    # Query i sees keys j with i - window < j <= i (transformers' convention).
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def build_model(cfg: ModelConfig, device=None, dtype: torch.dtype | None = None, std: float = 0.02) -> CausalLM:
    """A freshly initialised model (from-scratch training)."""
    model = CausalLM(cfg).to(device=device)
    model.init_weights(std)
    if dtype is not None:
        model.to(dtype)
    return model
