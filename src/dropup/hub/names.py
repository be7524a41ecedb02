"""Tensor names per architecture: what a dense source holds and what an MoE target calls its parts
(an MoE source, whose experts are expanded, holds the target's own: ``MoEShape``).

The non-FFN tensors (embeddings, attention, norms, LM head) have the same names in every
Llama-family dense model and in Mixtral / Qwen2-MoE / Qwen3-MoE / GraniteMoE, so they are copied
under their own name. Only the FFN changes: one dense MLP becomes a router plus E experts, written
under the names that checkpoints on the Hugging Face Hub use: one tensor per expert and matrix
(transformers 4.x loads them as they are, 5.x fuses them on load, vLLM and SGLang read them
directly), except GraniteMoE, whose Hub checkpoints hold each layer's experts in two stacked
tensors (``fused_experts``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from dropup.errors import UserError
from dropup.hub.config import DENSE_TYPES, MOE_TYPES, ModelConfig

if TYPE_CHECKING:
    import torch

SOURCE_TYPES = DENSE_TYPES
TARGET_TYPES = MOE_TYPES
# First entry is what `--target auto` picks.
TARGETS_OF = {
    "llama": ("mixtral", "qwen3_moe"),
    "mistral": ("mixtral", "qwen3_moe"),
    "qwen2": ("qwen2_moe",),
    "qwen3": ("qwen3_moe",),
    "granite": ("granitemoe",),
    # An MoE source is expanded (more experts from its own, ``MoEShape``) within its family.
    **{moe: (moe,) for moe in MOE_TYPES},
}
# MoE sources whose experts can be expanded (every target; GraniteMoE reads its stacked tensors).
EXPANDABLE_TYPES = MOE_TYPES
_EXPERT_MATRIX = {  # dropup's matrix name -> the target's per-expert tensor name
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
    "qwen2_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "qwen3_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}
# Targets whose config.json states the routed experts' width apart from the dense d_f
# (moe_intermediate_size; Mixtral's intermediate_size is the experts'), so --granularity applies.
GRANULAR_TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe")
_MOE_BLOCK = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp", "granitemoe": "block_sparse_moe"}
_ROUTER = {"granitemoe": "router.layer"}  # elsewhere "gate"
# GraniteMoE: input_linear [E, 2 d_f, d_h] is gate and up stacked along dim 1 (its forward
# chunks the product in two: silu(first half) * second half), output_linear [E, d_h, d_f] is down.
_FUSED = {"granitemoe": {"input_linear": ("gate", "up"), "output_linear": ("down",)}}


@dataclass(frozen=True)
class DenseShape:
    """The tensor shapes of a dense Llama-family model: a view of its ``ModelConfig`` (the one
    reader of config.json) that lists every tensor the checkpoint must hold."""

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
    config: ModelConfig = field(compare=False, repr=False)

    @classmethod
    def of(cls, cfg: ModelConfig) -> DenseShape:
        return cls(model_type=cfg.model_type, vocab=cfg.vocab_size, hidden=cfg.hidden_size,
                   d_f=cfg.intermediate_size, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                   kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, tied=cfg.tie_word_embeddings,
                   qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm, config=cfg)

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
        return ffn_matrix_shape(matrix, self.d_f, self.hidden)


def ffn_matrix_shape(matrix: str, width: int, hidden: int) -> tuple[int, int]:
    """An FFN matrix of ``width`` intermediate neurons as stored (nn.Linear: down is [hidden, width])."""
    return (hidden, width) if matrix == "down" else (width, hidden)


@dataclass(frozen=True)
class MoEShape(DenseShape):
    """An MoE checkpoint as the source of expert expansion: the same non-expert tensors as a dense
    model's, ``d_f`` the width of its dense layers (Qwen-MoE's ``mlp_only_layers``; unused
    elsewhere), plus what its MoE layers hold."""

    experts: int  # routed experts per MoE layer
    top_k: int
    norm_topk: bool  # top-k weights renormalised (always but for Qwen-MoE's norm_topk_prob false)
    expert_d_f: int  # each routed expert's width
    shared_d_f: int  # Qwen2-MoE's shared expert (0: none)
    moe_layers: tuple[int, ...]

    @classmethod
    def of(cls, cfg: ModelConfig) -> MoEShape:
        dense = DenseShape.of(cfg)
        return cls(**{f: getattr(dense, f) for f in dense.__dataclass_fields__}, experts=cfg.num_experts,
                   top_k=cfg.num_experts_per_tok, norm_topk=cfg.norm_topk_prob,
                   expert_d_f=cfg.moe_intermediate_size, shared_d_f=cfg.shared_expert_intermediate_size,
                   moe_layers=tuple(cfg.moe_layers))

    def expert_shape(self, matrix: str) -> tuple[int, int]:
        return ffn_matrix_shape(matrix, self.expert_d_f, self.hidden)

    def shared_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Qwen2-MoE's shared expert and its gate in MoE layer ``layer`` (empty elsewhere)."""
        names = shared_expert_names(self.model_type, layer) if self.shared_d_f else {}
        return {name: (1, self.hidden) if m == "shared_gate" else ffn_matrix_shape(m, self.shared_d_f, self.hidden)
                for m, name in names.items()}

    def all_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the MoE checkpoint: the non-FFN ones, each MoE layer's router, experts
        (stacked where the family stacks them) and shared expert, each dense layer's FFN."""
        out = self.non_ffn_tensors()
        t, E = self.model_type, self.experts
        for layer in range(self.layers):
            if layer not in self.moe_layers:
                out.update({self.ffn_name(layer, m): self.ffn_shape(m) for m in ("gate", "up", "down")})
                continue
            out[router_name(t, layer)] = (E, self.hidden)
            for name, matrices in fused_experts(t, layer).items():
                rows, cols = self.expert_shape(matrices[0])
                out[name] = (E, rows * len(matrices), cols)
            for e in range(E if not fused_experts(t, layer) else 0):
                out.update({expert_name(t, layer, e, m): self.expert_shape(m) for m in ("gate", "up", "down")})
            out.update(self.shared_tensors(layer))
        return out


def source_shape(cfg: dict, where: str = "SRC") -> DenseShape:
    """A source's shape: a ``DenseShape``, or a ``MoEShape`` for an MoE to expand."""
    mt = cfg.get("model_type")
    if mt not in EXPANDABLE_TYPES:
        if mt not in SOURCE_TYPES:
            raise UserError(f"{where}: model_type {mt!r} is not supported; supported inputs are the dense "
                            f"{', '.join(SOURCE_TYPES)} and, to expand their experts, the MoE "
                            f"{', '.join(EXPANDABLE_TYPES)}")
        return dense_shape(cfg, where)
    moe = MoEShape.of(ModelConfig.from_hf(cfg, where))
    if not moe.moe_layers:
        raise UserError(f"{where}: a {moe.model_type} whose config.json makes no layer MoE "
                        "(mlp_only_layers / decoder_sparse_step) has no experts to expand; give a dense "
                        "or an MoE checkpoint")
    return moe


def dense_shape(cfg: dict, where: str = "SRC") -> DenseShape:
    """Read a dense model's config.json dict (through ``ModelConfig.from_hf``)."""
    if cfg.get("model_type") not in SOURCE_TYPES:
        raise UserError(f"{where}: model_type {cfg['model_type']!r} is not supported; supported dense "
                        f"inputs are {', '.join(SOURCE_TYPES)}")
    return DenseShape.of(ModelConfig.from_hf(cfg, where))


def resolve_target(shape: DenseShape, target: str) -> str:
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
    windows = shape.config.sliding_windows
    if target == "qwen3_moe" and any(windows) and not all(windows):
        raise UserError(
            "SRC uses sliding-window attention on only some layers, which Qwen3-MoE cannot represent"
        )
    return target


def adds_qk_norm(shape: DenseShape, target: str) -> bool:
    """Qwen3-MoE always normalises q and k; a Llama/Mistral source has no such weights."""
    return target == "qwen3_moe" and not shape.qk_norm


def function_preserving_target(shape: DenseShape, target: str) -> bool:
    return not adds_qk_norm(shape, target)


def fused_experts(target: str, layer: int) -> dict[str, tuple[str, ...]]:
    """For a target that stacks a layer's experts ([E, rows, cols]): each tensor's name and the
    matrices stacked along its dim 1, in order. Empty for targets with one tensor per expert."""
    p = f"model.layers.{layer}.{_MOE_BLOCK[target]}."
    return {f"{p}{name}.weight": matrices for name, matrices in _FUSED.get(target, {}).items()}


def stacked_in(target: str, layer: int, matrix: str) -> tuple[str, tuple[str, ...]] | None:
    """The fused tensor holding ``matrix`` of every expert and the matrices it stacks, or None
    where each expert has a tensor of its own."""
    return next(((n, ms) for n, ms in fused_experts(target, layer).items() if matrix in ms), None)


def expert_name(target: str, layer: int, expert: int, matrix: str) -> str:
    """The tensor of one expert's matrix. For a fused target (``fused_experts``) it names that
    expert's part of a stacked tensor, which the converter fills but no file holds."""
    stacked = stacked_in(target, layer, matrix)
    if stacked is not None:
        return f"{stacked[0]}[{expert}].{matrix}"
    return (
        f"model.layers.{layer}.{_MOE_BLOCK[target]}.experts.{expert}."
        f"{_EXPERT_MATRIX[target][matrix]}.weight"
    )


def expert_matrix(stacked: torch.Tensor, matrices: tuple[str, ...], matrix: str) -> torch.Tensor:
    """Matrix ``matrix`` of every expert, [E, rows, cols], as a view of a fused tensor that
    stacks ``matrices`` (equal sizes) along dim 1."""
    rows = stacked.shape[1] // len(matrices)
    return stacked.narrow(1, matrices.index(matrix) * rows, rows)


def router_name(target: str, layer: int) -> str:
    return f"model.layers.{layer}.{_MOE_BLOCK[target]}.{_ROUTER.get(target, 'gate')}.weight"


def router_bias_name(target: str, layer: int) -> str:
    """A layer's selection bias (aux-loss-free balancing) in dropup's router-bias file: named
    beside its router as DeepSeek-V3's checkpoints name theirs; no Mixtral or Qwen-MoE config
    has a slot for it, so it never goes into the model's own safetensors."""
    return router_name(target, layer).removesuffix(".weight") + ".e_score_correction_bias"


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


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a Hub tensor name belongs to (None for embeddings, final norm, LM head)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def qk_norm_names(layer: int) -> tuple[str, str]:
    p = f"model.layers.{layer}.self_attn."
    return p + "q_norm.weight", p + "k_norm.weight"
