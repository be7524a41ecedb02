"""The typed model config: what dropup's model needs from a Hugging Face ``config.json``.

``ModelConfig.from_hf`` resolves the per-architecture spellings (``num_local_experts`` vs
``num_experts``, four ways to enable a sliding window, two RoPE layouts) once, so the model code
never looks at ``model_type``; ``to_hf`` writes a config.json transformers loads as the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from dropup.errors import UserError

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED_TYPES = DENSE_TYPES + MOE_TYPES
ARCHITECTURES = {  # model_type -> the transformers class named in config.json
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
            architectures=[ARCHITECTURES[mt]],
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
