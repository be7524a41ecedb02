"""Architectures: what a dense source holds, what an MoE target is called, and its config.json.

The non-FFN tensors (embeddings, attention, norms, LM head) have the same names in every
Llama-family dense model and in Mixtral / Qwen2-MoE / Qwen3-MoE, so they are copied under their
own name. Only the FFN changes: one dense MLP becomes a router plus E experts, written under the
per-expert names that checkpoints on the Hugging Face Hub use (transformers 4.x loads them as they
are, 5.x fuses them on load, vLLM and SGLang read them directly).
"""

from __future__ import annotations

from dataclasses import dataclass

from dropup.hub.config import ARCHITECTURES, DENSE_TYPES, MOE_TYPES
from dropup.errors import UserError

SOURCE_TYPES = DENSE_TYPES
TARGET_TYPES = MOE_TYPES
# First entry is what `--target auto` picks.
TARGETS_OF = {
    "llama": ("mixtral", "qwen3_moe"),
    "mistral": ("mixtral", "qwen3_moe"),
    "qwen2": ("qwen2_moe",),
    "qwen3": ("qwen3_moe",),
}
_EXPERT_MATRIX = {  # dropup's matrix name -> the target's per-expert tensor name
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
    "qwen2_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "qwen3_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}
_MOE_BLOCK = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}


@dataclass(frozen=True)
class DenseShape:
    """The shapes of a dense Llama-family model, read from its config.json."""

    model_type: str
    vocab: int
    hidden: int
    d_f: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool  # bias on q, k, v projections
    o_bias: bool  # bias on the output projection
    qk_norm: bool  # RMSNorm over head_dim on q and k (Qwen3)

    def ffn_name(self, layer: int, matrix: str) -> str:
        return f"model.layers.{layer}.mlp.{matrix}_proj.weight"

    def non_ffn_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor besides the FFN, in the order it is written, with its shape."""
        h, hd = self.hidden, self.head_dim
        q_out, kv_out = self.heads * hd, self.kv_heads * hd
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            for proj, rows in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                out[p + f"self_attn.{proj}_proj.weight"] = (rows, h)
                if self.qkv_bias:
                    out[p + f"self_attn.{proj}_proj.bias"] = (rows,)
            out[p + "self_attn.o_proj.weight"] = (h, q_out)
            if self.o_bias:
                out[p + "self_attn.o_proj.bias"] = (h,)
            if self.qk_norm:
                out[p + "self_attn.q_norm.weight"] = (hd,)
                out[p + "self_attn.k_norm.weight"] = (hd,)
            out[p + "post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, h)
        return out

    def all_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the dense checkpoint, FFN included, with its shape."""
        out = self.non_ffn_tensors()
        for layer in range(self.layers):
            for m in ("gate", "up", "down"):
                out[self.ffn_name(layer, m)] = self.ffn_shape(m)
        return out

    def ffn_shape(self, matrix: str) -> tuple[int, int]:
        return (self.hidden, self.d_f) if matrix == "down" else (self.d_f, self.hidden)


def _need(cfg: dict, key: str, where: str) -> int:
    if key not in cfg or cfg[key] is None:
        raise UserError(f"{where}: config.json has no '{key}'; it is not a complete model config")
    return cfg[key]


def dense_shape(cfg: dict, where: str = "SRC") -> DenseShape:
    model_type = cfg.get("model_type")
    if model_type not in SOURCE_TYPES:
        raise UserError(
            f"{where}: model_type {model_type!r} is not supported; supported dense inputs are "
            f"{', '.join(SOURCE_TYPES)}"
        )
    if cfg.get("mlp_bias"):
        raise UserError(f"{where}: mlp_bias=true is not supported (MoE experts have no biases)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act {act!r} is not supported; the MoE targets use silu")
    hidden = _need(cfg, "hidden_size", where)
    heads = _need(cfg, "num_attention_heads", where)
    head_dim = cfg.get("head_dim") or hidden // heads
    attention_bias = bool(cfg.get("attention_bias", False))
    return DenseShape(
        model_type=model_type,
        vocab=_need(cfg, "vocab_size", where),
        hidden=hidden,
        d_f=_need(cfg, "intermediate_size", where),
        layers=_need(cfg, "num_hidden_layers", where),
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        qk_norm=model_type == "qwen3",
    )


def resolve_target(shape: DenseShape, cfg: dict, target: str) -> str:
    allowed = TARGETS_OF[shape.model_type]
    if target == "auto":
        target = allowed[0]
    if target not in allowed:
        raise UserError(
            f"--target {target} cannot be built from a {shape.model_type} model; "
            f"choose one of: {', '.join(allowed)}"
        )
    if target == "mixtral" and (shape.qkv_bias or shape.o_bias):
        raise UserError(
            "SRC uses attention_bias=true, which Mixtral cannot represent; use --target qwen3_moe"
        )
    if target == "qwen3_moe" and _sliding_layers(cfg, shape) not in ("none", "all"):
        raise UserError(
            "SRC uses sliding-window attention on only some layers, which Qwen3-MoE cannot represent"
        )
    return target


def _sliding_layers(cfg: dict, shape: DenseShape) -> str:
    """'none', 'all' or 'some': which layers of the dense model use sliding-window attention."""
    if shape.model_type == "mistral":
        return "all" if cfg.get("sliding_window") else "none"
    if shape.model_type in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
            return "none"
        types = cfg.get("layer_types")
        if types is None:
            mwl = cfg.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(shape.layers)]
        sliding = sum(t == "sliding_attention" for t in types)
        return "none" if sliding == 0 else "all" if sliding == len(types) else "some"
    return "none"


def adds_qk_norm(shape: DenseShape, target: str) -> bool:
    """Qwen3-MoE always normalises q and k; a Llama/Mistral source has no such weights."""
    return target == "qwen3_moe" and not shape.qk_norm


def function_preserving_target(shape: DenseShape, target: str) -> bool:
    return not adds_qk_norm(shape, target)


def expert_name(target: str, layer: int, expert: int, matrix: str) -> str:
    return (
        f"model.layers.{layer}.{_MOE_BLOCK[target]}.experts.{expert}."
        f"{_EXPERT_MATRIX[target][matrix]}.weight"
    )


def router_name(target: str, layer: int) -> str:
    return f"model.layers.{layer}.{_MOE_BLOCK[target]}.gate.weight"


def shared_expert_names(target: str, layer: int) -> dict[str, str]:
    """Qwen2-MoE's always-on shared expert and its sigmoid gate; empty for other targets."""
    if target != "qwen2_moe":
        return {}
    p = f"model.layers.{layer}.mlp."
    return {
        "gate": p + "shared_expert.gate_proj.weight",
        "up": p + "shared_expert.up_proj.weight",
        "down": p + "shared_expert.down_proj.weight",
        "shared_gate": p + "shared_expert_gate.weight",
    }


def qk_norm_names(layer: int) -> tuple[str, str]:
    p = f"model.layers.{layer}.self_attn."
    return p + "q_norm.weight", p + "k_norm.weight"


# Keys of a dense config that mean nothing (or something wrong) in the MoE config.
_DROP_KEYS = {
    "architectures", "model_type", "auto_map", "_name_or_path", "transformers_version",
    "mlp_bias", "pretraining_tp", "torch_dtype", "dtype",
}


def moe_config(
    src_cfg: dict,
    shape: DenseShape,
    target: str,
    *,
    num_experts: int,
    top_k: int,
    aux_loss_coef: float,
    dtype_name: str,
    transformers_version: str,
) -> dict:
    """The target's config.json: the source's settings (rope, eps, vocab, special tokens...) kept,
    the MoE fields set, and top-k weights renormalised so naive upcycling is exact."""
    cfg = {k: v for k, v in src_cfg.items() if k not in _DROP_KEYS}
    cfg["architectures"] = [ARCHITECTURES[target]]
    cfg["model_type"] = target
    cfg["head_dim"] = shape.head_dim
    cfg["num_key_value_heads"] = shape.kv_heads
    cfg["tie_word_embeddings"] = shape.tied
    cfg["router_aux_loss_coef"] = aux_loss_coef
    cfg["output_router_logits"] = False
    cfg["num_experts_per_tok"] = top_k
    cfg["intermediate_size"] = shape.d_f
    sliding = _sliding_layers(src_cfg, shape)
    if target == "mixtral":
        # Mixtral always renormalises the top-k routing weights.
        cfg["num_local_experts"] = num_experts
        cfg["router_jitter_noise"] = 0.0
        cfg.pop("attention_bias", None)
        cfg["sliding_window"] = src_cfg.get("sliding_window") if sliding == "all" else None
    else:
        cfg["num_experts"] = num_experts
        cfg["norm_topk_prob"] = True
        cfg["moe_intermediate_size"] = shape.d_f
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = []
    if target == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = shape.d_f
        cfg["qkv_bias"] = True
    if target == "qwen3_moe":
        cfg["attention_bias"] = shape.qkv_bias
        cfg["use_sliding_window"] = sliding == "all"
        if sliding == "all":
            cfg["sliding_window"] = src_cfg.get("sliding_window")
        cfg.pop("layer_types", None)
        cfg.pop("max_window_layers", None)
    _legacy_rope_keys(cfg)
    cfg["torch_dtype"] = dtype_name
    cfg["transformers_version"] = transformers_version
    return dict(sorted(cfg.items()))


def _legacy_rope_keys(cfg: dict) -> None:
    """transformers 5 writes RoPE settings as ``rope_parameters``; 4.x reads ``rope_theta`` and
    ``rope_scaling`` (and would silently fall back to Mixtral's default theta of 1e6 without them).
    Writing both keeps the checkpoint exact under either major version."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return
    if "rope_theta" in rp:
        cfg.setdefault("rope_theta", rp["rope_theta"])
    if rp.get("rope_type", "default") != "default":
        cfg.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
