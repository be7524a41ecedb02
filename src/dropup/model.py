"""The training engine's model: one plain PyTorch Llama-family decoder with a dense or MoE FFN.

It covers the architectures the converter reads and writes -- dense ``llama``, ``mistral``,
``qwen2``, ``qwen3`` and MoE ``mixtral``, ``qwen2_moe``, ``qwen3_moe`` -- and reads and writes
Hugging Face checkpoints directly (same ``config.json``, same tensor names), so a checkpoint goes
from transformers to dropup and back without conversion scripts.

Reading order: ``ModelConfig`` (the typed config.json), the building blocks (``RMSNorm``,
``RotaryEmbedding``, ``Attention``, ``FeedForward``, ``MoE``), ``CausalLM``, then checkpoint I/O
(``load_model``, ``save_model``) and the losses (``load_balancing_loss``, ``router_z_loss``).

Public API::

    model = load_model("path/to/hf_checkpoint", device="cuda", dtype=torch.float32)
    logits = model(input_ids)                                     # [batch, seq, vocab]
    logits, router_logits = model(input_ids, return_router_logits=True)
    # router_logits: one fp32 tensor [batch * seq, num_experts] per MoE layer, in layer order
    aux = load_balancing_loss(router_logits, model.config.num_experts_per_tok,
                              model.config.num_experts, mode="pooled")
    model.save_pretrained("out/")                                 # == save_model(model, "out/")

Inside the model the experts of a layer are stacked into three parameters ``[E, out, in]`` so that
one grouped GEMM serves all experts; only the checkpoint I/O knows the per-expert Hub names.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dropup.errors import UserError

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED_TYPES = DENSE_TYPES + MOE_TYPES
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """What the model needs from a Hugging Face ``config.json``, with one meaning per field.

    Hugging Face spells the same thing differently per architecture (``num_local_experts`` vs
    ``num_experts``, ``attention_bias`` vs always-on qkv bias, four ways to enable sliding window);
    ``from_hf`` resolves those spellings once so the model code never looks at ``model_type``.
    Every key it does not interpret is kept in ``extra`` and written back unchanged by ``to_hf``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense FFN width (dense models, and dense layers of MoE models)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # None for plain RoPE, else a dict with "rope_type" and that type's parameters.
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (qwen3, qwen3_moe)
    tie_word_embeddings: bool = False
    # Per-layer window (None = full causal attention); resolved from the HF spelling.
    sliding_windows: list[int | None] = field(default_factory=list)
    # MoE (num_experts == 0 for dense models)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # expert width
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # qwen2_moe's always-on shared expert; 0 = none
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.02  # the paper's; as written in config.json (the trainer has its own)
    # "rope_parameters" (transformers 5) or "rope_scaling" (4.x): written back the way it was read.
    rope_key: str = "rope_scaling"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_hidden_layers

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        # Qwen-MoE can interleave dense layers; Mixtral has decoder_sparse_step 1 and no dense ones.
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    # ---- from / to config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED_TYPES:
            raise UserError(
                f"model_type {mt!r} is not supported by dropup's model; supported: "
                + ", ".join(SUPPORTED_TYPES)
            )
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UserError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
        if d.get("mlp_bias"):
            raise UserError("mlp_bias=true is not supported (no Llama-family MoE target has FFN biases)")

        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        # qwen3's transformers default head_dim is 128, not hidden / heads.
        head_dim = d.get("head_dim") or (128 if mt == "qwen3" else hidden // heads)
        layers = d["num_hidden_layers"]
        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = {
            "qwen2": True,  # Qwen2 always has q/k/v bias and no config key for it
            "qwen2_moe": bool(d.get("qkv_bias", True)),
            "mistral": False,
            "mixtral": False,
        }.get(mt, attention_bias)
        o_bias = attention_bias if mt in ("llama", "qwen3", "qwen3_moe") else False

        theta, scaling = _rope_from_hf(d, mt)
        cfg = cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5 if mt == "mixtral" else 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_windows=_sliding_windows_from_hf(d, mt, layers),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),  # transformers' default
            rope_key="rope_parameters" if "rope_parameters" in d else "rope_scaling",
        )
        if mt == "mixtral":
            cfg.num_experts = d.get("num_local_experts", 8)
            cfg.num_experts_per_tok = d.get("num_experts_per_tok", 2)
            cfg.moe_intermediate_size = d["intermediate_size"]
            cfg.norm_topk_prob = True  # Mixtral always renormalises the top-k weights
        elif mt in ("qwen2_moe", "qwen3_moe"):
            # transformers 5 writes qwen3_moe's expert count as num_local_experts.
            cfg.num_experts = d["num_experts"] if "num_experts" in d else d["num_local_experts"]
            cfg.num_experts_per_tok = d["num_experts_per_tok"]
            cfg.moe_intermediate_size = d["moe_intermediate_size"]
            cfg.norm_topk_prob = bool(d.get("norm_topk_prob", False))
            cfg.decoder_sparse_step = d.get("decoder_sparse_step", 1) or 1
            cfg.mlp_only_layers = list(d.get("mlp_only_layers") or [])
            if mt == "qwen2_moe":
                cfg.shared_expert_intermediate_size = d.get("shared_expert_intermediate_size", 0) or 0
        known = {f.name for f in fields(cls)} | _HF_KEYS_READ
        cfg.extra = {k: v for k, v in d.items() if k not in known}
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict; loads in transformers as the same model."""
        mt = self.model_type
        d: dict[str, Any] = dict(self.extra)
        d.update(
            model_type=mt,
            architectures=[_ARCHITECTURES[mt]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_intermediate_size if mt == "mixtral" else self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if mt in ("llama", "qwen3", "qwen3_moe"):
            d["attention_bias"] = self.qkv_bias
            if mt == "llama":
                d["mlp_bias"] = False
        if mt == "qwen2_moe":
            d["qkv_bias"] = self.qkv_bias
        _rope_to_hf(self, d)
        _sliding_windows_to_hf(self, d)
        if mt == "mixtral":
            d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        elif mt in ("qwen2_moe", "qwen3_moe"):
            d.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
            )
            if mt == "qwen3_moe":  # both spellings: transformers 4 reads the first, 5 the second
                d["num_local_experts"] = self.num_experts
            if mt == "qwen2_moe":
                d["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        if self.is_moe:
            d["router_aux_loss_coef"] = self.router_aux_loss_coef
        return d

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise UserError("sliding_windows must have one entry per layer")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UserError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UserError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")


# Keys that from_hf turns into typed fields (so they do not also land in `extra`).
_HF_KEYS_READ = {
    "architectures", "hidden_act", "mlp_bias", "attention_bias", "qkv_bias", "rope_theta",
    "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window", "layer_types",
    "num_local_experts",
}  # fmt: skip
_DEFAULT_THETA = {"mixtral": 1e6}


def _rope_from_hf(d: dict[str, Any], mt: str) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes one `rope_parameters` dict (theta included); 4.x wrote `rope_theta`
    # plus an optional `rope_scaling` dict whose type key was once called "type".
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", _DEFAULT_THETA.get(mt, 10000.0))))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return theta, {"rope_type": rope_type, **params}


def _rope_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    # Write the spelling the source used; for a config built from scratch use the 4.x spelling,
    # which transformers 5 still reads (the reverse is not true).
    d.pop("rope_parameters", None)
    d.pop("rope_scaling", None)
    d.pop("rope_theta", None)
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if cfg.rope_key == "rope_parameters":
        d["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(scaling or {})}
    else:
        d["rope_theta"] = cfg.rope_theta
        d["rope_scaling"] = scaling


def _sliding_windows_from_hf(d: dict[str, Any], mt: str, layers: int) -> list[int | None]:
    """Which layers use a sliding window, following each architecture's transformers rule."""
    window = d.get("sliding_window", 4096 if mt == "mistral" else None)
    if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not d.get("use_sliding_window", False):
        window = None
    if not window:  # qwen2_moe writes 0 for "off"
        return [None] * layers
    layer_types = d.get("layer_types")
    if not layer_types:
        max_window_layers = d.get("max_window_layers", 28)
        if mt in ("qwen2", "qwen3"):
            layer_types = ["sliding_attention" if i >= max_window_layers else "full_attention" for i in range(layers)]
        elif mt == "qwen2_moe":
            layer_types = [
                "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention"
                for i in range(layers)
            ]
        else:  # mistral, mixtral, qwen3_moe: every layer
            layer_types = ["sliding_attention"] * layers
    return [window if t == "sliding_attention" else None for t in layer_types]


def _sliding_windows_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    windows = {w for w in cfg.sliding_windows if w}
    if len(windows) > 1:
        raise UserError("config.json can express only one sliding-window size")
    window = windows.pop() if windows else None
    mt = cfg.model_type
    if mt in ("mistral", "mixtral"):
        if window and not all(cfg.sliding_windows):
            raise UserError(f"{mt} applies its sliding window to every layer or none")
        d["sliding_window"] = window
        return
    if mt == "llama":
        if window:
            raise UserError("llama has no sliding window")
        return
    d["use_sliding_window"] = window is not None
    d["sliding_window"] = window if window else (0 if mt == "qwen2_moe" else None)
    if mt != "qwen3_moe":
        # An explicit per-layer list is the one spelling transformers reads the same way everywhere.
        d["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows]
    elif window and not all(cfg.sliding_windows):
        raise UserError("qwen3_moe applies its sliding window to every layer or none")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (a bf16 mean of squares loses too much), scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.o_bias)
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
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:
            # With an explicit mask flash is out and the other kernels want equal head counts.
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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


class MoE(nn.Module):
    """Dropless token-choice top-k MoE with an fp32 router (Mixtral / Qwen-MoE semantics)."""

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

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E] (fp32), top-k weights [N, k] (fp32) and expert ids [N, k]."""
        # fp32 even under bf16 autocast: near-ties in bf16 flip the top-k choice between steps.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, ids

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        out = self.run_experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape), logits

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n, k, e = x.shape[0], self.top_k, self.num_experts
        # Sort the N*k (token, expert) assignments by expert so each expert sees a contiguous block.
        # Everything here stays on the device: no .item(), no bincount (it syncs to size its output).
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // k
        counts = torch.zeros(e, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        xs = x[token_of]

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
            ys = _grouped_mm(F.silu(gate) * up, w.down_proj.to(dtype), offs)
        else:
            # Reference path: one matmul per expert. counts.tolist() syncs, fine off the hot path.
            outs = []
            for i, c in enumerate(xs.to(dtype).split(counts.tolist())):
                h = F.silu(F.linear(c, w.gate_proj[i].to(dtype))) * F.linear(c, w.up_proj[i].to(dtype))
                outs.append(F.linear(h, w.down_proj[i].to(dtype)))
            ys = torch.cat(outs)
        # Back to (token, slot) order, weight in fp32, sum the k slots. A gather plus a sum instead
        # of index_add_ keeps the result deterministic on CUDA.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        ys = ys[inverse].view(n, k, -1)
        out = (ys.float() * weights[..., None]).sum(dim=1)
        return out.to(ys.dtype)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x in group g (rows offs[g-1]:offs[g]) times w[g].T; w is [E, out, in]."""
    # Passing the transpose of the contiguous [E, out, in] weight gives the column-major right
    # operand the CUDA kernel wants, with no copy.
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.sliding_window = cfg.sliding_windows[i]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, router_logits = h
            return x + h, router_logits
        return x + h, None


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
    ):
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)[None]
        cos, sin = self.model.rotary_emb(position_ids, t)
        windows = {layer.sliding_window for layer in self.model.layers}
        masks = {w: _sliding_mask(t, w, input_ids.device) for w in windows}
        x = self.model.embed_tokens(input_ids)
        router_logits = []
        for layer in self.model.layers:
            x, r = layer(x, cos, sin, masks[layer.sliding_window])
            if r is not None:
                router_logits.append(r)
        x = self.model.norm(x)
        logits = F.linear(x, self.output_weight)
        return (logits, router_logits) if return_router_logits else logits

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

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

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        save_model(self, path, **kwargs)


def _sliding_mask(t: int, window: int | None, device) -> torch.Tensor | None:
    # A window at least as long as the sequence is plain causal attention: keep the fast path.
    if window is None or window >= t:
        return None
    i = torch.arange(t, device=device)
    # Query i sees keys j with i - window < j <= i (transformers' convention).
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy in fp32; ``targets`` are already shifted ([batch, seq])."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------
# Checkpoint I/O
# --------------------------------------------------------------------------------------------

_EXPERT_PARAM = re.compile(r"model\.layers\.(\d+)\.mlp\.(router\.weight|experts\.(gate|up|down)_proj)")
_MIXTRAL_W = {"gate": "w1", "up": "w3", "down": "w2"}
# Tensors old checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def hf_names(name: str, cfg: ModelConfig) -> str | list[str]:
    """The checkpoint name(s) of one of the model's parameters: a list for stacked experts."""
    m = _EXPERT_PARAM.fullmatch(name)
    if not m:
        return name
    block = f"model.layers.{m.group(1)}." + ("block_sparse_moe" if cfg.model_type == "mixtral" else "mlp")
    if m.group(2) == "router.weight":
        return f"{block}.gate.weight"
    proj = m.group(3)
    leaf = _MIXTRAL_W[proj] if cfg.model_type == "mixtral" else f"{proj}_proj"
    return [f"{block}.experts.{e}.{leaf}.weight" for e in range(cfg.num_experts)]


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's (full, unsharded) state dict under Hub names, experts unstacked."""
    out = {}
    for name, t in state_dict.items():
        hf = hf_names(name, cfg)
        if isinstance(hf, list):
            out.update(zip(hf, t.unbind(0)))
        else:
            out[hf] = t
    return out


def from_hf_state_dict(tensors, cfg: ModelConfig, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's state dict for parameter ``names`` from a mapping of Hub-named tensors.

    ``tensors`` needs only ``__getitem__`` and ``keys()`` so a lazy safetensors reader works.
    """
    available = set(tensors.keys())
    wanted = {n: hf_names(n, cfg) for n in names}
    needed = {h for hf in wanted.values() for h in ([hf] if isinstance(hf, str) else hf)}
    missing = sorted(needed - available)
    unexpected = sorted(
        k for k in available - needed
        if not _IGNORED.fullmatch(k) and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    )  # fmt: skip
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match its config.json ({cfg.model_type}): "
            f"{len(missing)} missing tensors {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}"
        )
    out = {}
    for n, hf in wanted.items():
        out[n] = torch.stack([tensors[h] for h in hf]) if isinstance(hf, list) else tensors[hf]
    return out


class _SafetensorsDir:
    """Lazy, name-addressed view of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, path: Path, device: str):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            files, weight_map = ["model.safetensors"], None
        else:
            raise UserError(
                f"{path} has no model.safetensors or model.safetensors.index.json (dropup reads safetensors only)"
            )
        self._handles = {f: safe_open(str(path / f), framework="pt", device=device) for f in files}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        self._where = weight_map

    def keys(self):
        return self._where.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def load_config(path: str | os.PathLike) -> ModelConfig:
    p = Path(path) / "config.json"
    if not p.exists():
        raise UserError(f"{p} not found: expected a Hugging Face checkpoint directory")
    return ModelConfig.from_hf(json.loads(p.read_text()))


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    moe_impl: str = "auto",
) -> CausalLM:
    """A ``CausalLM`` with the weights of the Hugging Face checkpoint at ``path``.

    ``dtype`` None keeps the checkpoint's dtype (train with ``torch.float32`` master weights).
    The model is built on the meta device and the tensors are assigned to it, so no memory or time
    goes into a random initialisation that would be overwritten.
    """
    path = Path(path)
    cfg = load_config(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = CausalLM(cfg)
    reader = _SafetensorsDir(path, str(device))
    names = list(model.state_dict().keys())
    state = from_hf_state_dict(reader, cfg, names)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb.to_empty(device=device)
    model.model.rotary_emb.reset()
    model.set_moe_impl(moe_impl)
    return model


def build_model(cfg: ModelConfig, device=None, dtype: torch.dtype | None = None, std: float = 0.02) -> CausalLM:
    """A freshly initialised model (from-scratch training)."""
    model = CausalLM(cfg).to(device=device)
    model.init_weights(std)
    if dtype is not None:
        model.to(dtype)
    return model


def save_model(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write ``config.json`` and safetensors under Hub names into ``path``.

    ``state_dict`` overrides the model's own (e.g. a full state dict gathered from FSDP shards).
    Files are written into a temporary directory beside ``path`` and moved into place, so a
    crash never leaves a half-written checkpoint under a final name.
    """
    from safetensors.torch import save_file

    cfg = model.config
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = to_hf_state_dict(sd, cfg)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().to("cpu").contiguous() for k, v in tensors.items()}
    hf_config = cfg.to_hf()
    saved_dtype = next(iter(tensors.values())).dtype
    hf_config["torch_dtype" if "dtype" not in hf_config else "dtype"] = str(saved_dtype).removeprefix("torch.")

    # Shard greedily in name order; one file when it fits.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += n

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        written = []
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            written.append("model.safetensors")
        else:
            weight_map = {}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
                written.append(fname)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
            written.append("model.safetensors.index.json")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        written.append("config.json")
        _move_into_place(tmp, path, written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, path: Path, written: list[str]) -> None:
    if not path.exists():
        os.rename(tmp, path)  # the whole checkpoint appears at once
        return
    # An existing directory (it may hold a tokenizer): replace file by file, weights before
    # config.json, and drop weight files of the previous checkpoint that the new one lacks.
    for old in path.glob("model*.safetensors*"):
        if old.name not in written:
            old.unlink()
    for name in written:
        os.replace(tmp / name, path / name)


# --------------------------------------------------------------------------------------------
# Losses on router logits
# --------------------------------------------------------------------------------------------


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
    averaged over layers. ``token_fractions`` ([layers, E]) replaces the local f, e.g. counts
    summed over a global batch (per-layer mode).
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
    if mode == "per-layer":
        p = prob_sum / tokens[:, None]
        return num_experts * (token_fractions * p).sum(-1).mean()
    raise ValueError(f"load-balancing mode must be 'pooled' or 'per-layer', got {mode!r}")


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    if not router_logits:
        return torch.zeros(())
    return torch.stack([torch.logsumexp(r.float(), dim=-1).pow(2).mean() for r in router_logits]).mean()


def router_metrics(router_logits: list[torch.Tensor], top_k: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-layer diagnostics for logging: load fractions [L, E] (sum to 1), max/min load ratio
    [L] (inf when an expert got nothing) and mean router entropy in nats [L]."""
    with torch.no_grad():
        counts = expert_counts(router_logits, top_k, num_experts)
        load = counts / counts.sum(-1, keepdim=True)
        ratio = load.max(-1).values / load.min(-1).values
        entropy = torch.stack(
            [-(r.float().softmax(-1) * r.float().log_softmax(-1)).sum(-1).mean() for r in router_logits]
        )
    return {"load": load, "max_min_ratio": ratio, "entropy": entropy}
