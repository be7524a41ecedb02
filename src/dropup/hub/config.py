"""The one reader and the one writer of Hugging Face ``config.json`` files.

``ModelConfig.from_hf`` resolves the per-architecture spellings (``num_local_experts`` vs
``num_experts``, four ways to enable a sliding window, two RoPE layouts) once, so no other code
looks at ``model_type`` to learn a shape; ``to_hf`` writes a config.json that transformers (4.x
and 5.x) loads as the same model. The converter (``dense_to_moe`` then ``to_hf``), the model
loader, the trainer's exports and ``dropup inspect`` all go through these two functions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from dropup.errors import UserError
from dropup.options import Range

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe")
# MoE types whose config.json can keep some layers dense (mlp_only_layers, decoder_sparse_step).
MIXED_LAYER_TYPES = ("qwen2_moe", "qwen3_moe")
SUPPORTED_TYPES = DENSE_TYPES + MOE_TYPES
ARCHITECTURES = {  # model_type -> the transformers class named in config.json
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "granite": "GraniteForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
}
# IBM Granite: a Llama with four scalars (see ModelConfig); no sliding window, bias on all four
# attention projections or none.
GRANITE_TYPES = ("granite", "granitemoe")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_COUNT = Range(ge=1, integer=True)


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
    # Granite's scalars (the neutral values elsewhere): embeddings times embedding_multiplier, each
    # residual branch times residual_multiplier, attention scores times attention_multiplier
    # (None: 1 / sqrt(head_dim)), logits divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
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

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers (all of them unless Qwen-MoE keeps some dense)."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ---- from / to config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Read a config.json dict. Defaults are transformers' own for each architecture, so a key
        left out means what it means to transformers. ``where`` prefixes error messages."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_TYPES:
            raise UserError(f"{where}: model_type {mt!r} is not supported; supported: "
                            + ", ".join(SUPPORTED_TYPES))
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers maps both names to the same SiLU
            raise UserError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
        if d.get("mlp_bias"):
            raise UserError(f"{where}: mlp_bias=true is not supported (no Llama-family MoE target has "
                            "FFN biases)")

        def need(key: str) -> int:
            if d.get(key) is None:
                raise UserError(f"{where}: config.json has no '{key}'; it is not a complete model config")
            return count(key)

        def count(key: str, default=None) -> int:
            """A size or count: a positive integer (a float or string here would fail deep inside)."""
            value = d.get(key)
            if value is None:
                value = default
            _COUNT.check(f"{where}: config.json '{key}'", value)
            return value

        hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
        # qwen3's and qwen3_moe's transformers default head_dim is 128, not hidden / heads.
        head_dim = count("head_dim", 128 if mt in ("qwen3", "qwen3_moe") else hidden // heads)
        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = {
            "qwen2": True,  # Qwen2 always has q/k/v bias and no config key for it
            "qwen2_moe": bool(d.get("qkv_bias", True)),
            "mistral": False,
            "mixtral": False,
        }.get(mt, attention_bias)
        o_bias = attention_bias if mt in ("llama", "qwen3", "qwen3_moe", *GRANITE_TYPES) else False

        theta, scaling = _rope_from_hf(d, mt)
        cfg = cls(
            model_type=mt,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=count("num_key_value_heads", heads),
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
        if mt in GRANITE_TYPES:
            for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
                value = d.get(key, 1.0)  # transformers' default for each of the four
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise UserError(f"{where}: config.json '{key}' is {json.dumps(value)}, not a number")
                setattr(cfg, key, float(value))
        if mt in ("mixtral", "granitemoe"):
            cfg.num_experts = count("num_local_experts", 8)
            cfg.num_experts_per_tok = count("num_experts_per_tok", 2)
            cfg.moe_intermediate_size = cfg.intermediate_size
            # Mixtral renormalises the top-k softmax weights; GraniteMoE takes the softmax of the
            # top-k logits, the same weights.
            cfg.norm_topk_prob = True
        elif mt in ("qwen2_moe", "qwen3_moe"):
            # transformers 5 writes qwen3_moe's expert count as num_local_experts.
            cfg.num_experts = count("num_experts") if "num_experts" in d else need("num_local_experts")
            cfg.num_experts_per_tok = need("num_experts_per_tok")
            cfg.moe_intermediate_size = need("moe_intermediate_size")
            cfg.norm_topk_prob = bool(d.get("norm_topk_prob", False))
            cfg.decoder_sparse_step = d.get("decoder_sparse_step", 1) or 1
            cfg.mlp_only_layers = list(d.get("mlp_only_layers") or [])
            if mt == "qwen2_moe":
                cfg.shared_expert_intermediate_size = d.get("shared_expert_intermediate_size", 0) or 0
        cfg.extra = {k: v for k, v in d.items() if k not in _HF_KEYS_TYPED}
        return cfg

    def to_hf(self, dtype: str | None = None, transformers_version: str | None = None) -> dict[str, Any]:
        """The config.json dict (keys sorted); transformers loads it as the same model.

        Keys the typed fields do not determine (``extra``) are written back as they were read.
        ``dtype`` is written as ``torch_dtype``, the spelling both transformers 4.x and 5.x read.
        """
        mt = self.model_type
        d: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in _WRITER_OWNED}
        d.update(
            model_type=mt,
            architectures=[ARCHITECTURES[mt]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_intermediate_size if mt in ("mixtral", "granitemoe") else self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if mt in ("llama", "qwen3", "qwen3_moe", *GRANITE_TYPES):
            d["attention_bias"] = self.qkv_bias
            if mt in ("llama", "granite"):
                d["mlp_bias"] = False
        if mt in GRANITE_TYPES:
            d.update(embedding_multiplier=self.embedding_multiplier, residual_multiplier=self.residual_multiplier,
                     attention_multiplier=self.attention_multiplier, logits_scaling=self.logits_scaling)
        if mt == "qwen2_moe":
            d["qkv_bias"] = self.qkv_bias
        _rope_to_hf(self, d)
        _sliding_windows_to_hf(self, d)
        if mt in ("mixtral", "granitemoe"):
            d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        elif mt in ("qwen2_moe", "qwen3_moe"):
            # num_experts, not num_local_experts: transformers 4.x reads only this spelling and
            # 5.x maps it onto num_local_experts.
            d.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
            )
            if mt == "qwen2_moe":
                d["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        if self.is_moe:
            d["router_aux_loss_coef"] = self.router_aux_loss_coef
        if dtype is not None:
            d["torch_dtype"] = dtype
        if transformers_version is not None:
            d["transformers_version"] = transformers_version
        return dict(sorted(d.items()))

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


# config.json keys that the typed fields determine (and to_hf always writes), so they are not kept
# in `extra`. The RoPE-scaling and sliding-window keys stay in `extra` too: to_hf rewrites them from
# the typed fields but keeps the source's spelling where the fields leave it open.
_HF_KEYS_TYPED = {
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "mlp_bias", "attention_bias", "qkv_bias",
    "rope_theta", "rope_parameters", "num_local_experts", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "norm_topk_prob", "shared_expert_intermediate_size", "decoder_sparse_step",
    "mlp_only_layers", "router_aux_loss_coef",
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
}  # fmt: skip
# What the writer alone decides: the dtype and version of the files written now, and keys whose
# meaning is the process that wrote the file (custom code, the source's path on the Hub).
_WRITER_OWNED = {"torch_dtype", "dtype", "transformers_version", "auto_map", "_name_or_path"}
_DEFAULT_THETA = {"mixtral": 1e6}


def _rope_from_hf(d: dict[str, Any], mt: str) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes one `rope_parameters` dict (theta included); 4.x wrote `rope_theta`
    # plus an optional `rope_scaling` dict whose type key was once called "type".
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.pop("rope_theta", d.get("rope_theta", _DEFAULT_THETA.get(mt, 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return theta, {"rope_type": rope_type, **params}


def _rope_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    """RoPE in the spelling the source used, plus the 4.x keys in every case: transformers 4.x
    reads only ``rope_theta`` and ``rope_scaling`` (without them Mixtral silently falls back to
    a theta of 1e6), and 5.x still reads them when ``rope_parameters`` is absent."""
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if cfg.rope_key == "rope_parameters":
        d["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(scaling or {})}
    d["rope_theta"] = cfg.rope_theta
    if scaling is not None or "rope_scaling" in d:  # plain RoPE: null where the source spelled it
        d["rope_scaling"] = scaling


def _sliding_windows_from_hf(d: dict[str, Any], mt: str, layers: int) -> list[int | None]:
    """Which layers use a sliding window, following each architecture's transformers rule."""
    window = d.get("sliding_window", 4096 if mt == "mistral" else None) if mt not in GRANITE_TYPES else None
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
    if mt in ("llama", *GRANITE_TYPES):
        if window:
            raise UserError(f"{mt} has no sliding window")
        return
    d["use_sliding_window"] = window is not None
    if window:
        d["sliding_window"] = window  # when off, a size the source gave (Qwen2's 4096 beside
        # "use_sliding_window": false) is kept as it was
    if mt == "qwen3_moe":
        if window and not all(cfg.sliding_windows):
            raise UserError("qwen3_moe applies its sliding window to every layer or none")
        d.pop("layer_types", None)  # not a qwen3_moe key, and max_window_layers means nothing there
        d.pop("max_window_layers", None)
    elif window or "layer_types" in d:
        # An explicit per-layer list is the one spelling transformers reads the same way everywhere.
        d["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows]


def config_json(d: dict[str, Any]) -> str:
    """The text of a config.json file: keys sorted at every level, as transformers writes it."""
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def parse_moe_layers(spec: str) -> int | list[int]:
    """``--moe-layers`` SPEC: ``every:N`` gives N (transformers' ``decoder_sparse_step``: layers
    N-1, 2N-1, ... are MoE), a comma list the sorted layer indices."""
    hint = "write layer indices such as 1,3 or every:N"
    text = str(spec).strip()
    if text.startswith("every:"):
        n = text.removeprefix("every:").strip()
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--moe-layers {spec!r}: N must be a positive integer (every:2 makes layers "
                            "1, 3, 5, ... MoE, as Qwen-MoE's decoder_sparse_step does)")
        return int(n)
    items = [x.strip() for x in text.split(",")]
    if not text or not all(items):
        raise UserError(f"--moe-layers {spec!r} names no layer or has an empty entry; {hint}")
    bad = next((x for x in items if not x.isdigit()), None)
    if bad is not None:
        raise UserError(f"--moe-layers {spec!r}: {bad!r} is not a layer index (0, 1, ...); {hint}")
    layers = [int(x) for x in items]
    twice = next((i for i in layers if layers.count(i) > 1), None)
    if twice is not None:
        raise UserError(f"--moe-layers {spec!r} lists layer {twice} twice")
    return sorted(layers)


def sparse_layout(spec: str, layers: int) -> tuple[int, list[int]]:
    """``decoder_sparse_step`` and ``mlp_only_layers`` for which transformers' Qwen-MoE (and
    ``ModelConfig.is_moe_layer``, the same rule) builds exactly the layers SPEC names as MoE."""
    parsed = parse_moe_layers(spec)
    if isinstance(parsed, int):
        if parsed > layers:
            raise UserError(f"--moe-layers {spec} makes no layer MoE in a {layers}-layer model "
                            f"(every:N makes layers N-1, 2N-1, ... MoE); choose N <= {layers}")
        return parsed, []
    out = next((i for i in parsed if i >= layers), None)
    if out is not None:
        raise UserError(f"--moe-layers {spec}: layer {out} is out of range; SRC has {layers} layers "
                        f"(0 to {layers - 1})")
    return 1, [i for i in range(layers) if i not in parsed]


def dense_to_moe(cfg: ModelConfig, target: str, *, num_experts: int, top_k: int,
                 aux_loss_coef: float, moe_layers: str | None = None) -> ModelConfig:
    """The MoE config that upcycling ``cfg`` builds: the dense model's settings kept (RoPE, eps,
    vocabulary, special tokens, windows), the MoE fields set, and the top-k weights renormalised
    so that naive upcycling computes exactly the dense function. ``moe_layers`` (``--moe-layers``
    SPEC) keeps the other layers dense, for targets that can say so."""
    if target not in MOE_TYPES:
        raise ValueError(f"{target!r} is not an MoE type")
    sparse_step, mlp_only = 1, []
    if moe_layers is not None:
        if target not in MIXED_LAYER_TYPES:
            raise UserError(f"--moe-layers: {target} cannot keep layers dense (its config.json has no "
                            f"mlp_only_layers); only --target {' and '.join(MIXED_LAYER_TYPES)} can, or "
                            "leave --moe-layers out")
        sparse_step, mlp_only = sparse_layout(moe_layers, cfg.num_hidden_layers)
    extra = {k: v for k, v in cfg.extra.items() if k not in _DENSE_ONLY_KEYS}
    extra["output_router_logits"] = False
    if target == "mixtral":
        extra["router_jitter_noise"] = 0.0
    return replace(
        cfg, model_type=target, extra=extra,
        num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=cfg.intermediate_size,
        norm_topk_prob=True, decoder_sparse_step=sparse_step, mlp_only_layers=mlp_only,
        router_aux_loss_coef=aux_loss_coef,
        qk_norm=cfg.qk_norm or target == "qwen3_moe",  # Qwen3-MoE always normalises q and k
        shared_expert_intermediate_size=cfg.intermediate_size if target == "qwen2_moe" else 0,
        sliding_windows=list(cfg.sliding_windows),
    )


# Keys of a dense Llama config that mean nothing in the MoE config.
_DENSE_ONLY_KEYS = {"pretraining_tp"}


def expand_moe(cfg: ModelConfig, *, num_experts: int, top_k: int, aux_loss_coef: float) -> ModelConfig:
    """The config of an MoE with more experts made from ``cfg``'s own (expert expansion): the
    same family and everything else as it was, its routing (norm_topk_prob) included."""
    if not cfg.is_moe:
        raise ValueError(f"{cfg.model_type!r} is not an MoE")
    return replace(cfg, num_experts=num_experts, num_experts_per_tok=top_k, router_aux_loss_coef=aux_loss_coef,
                   extra=dict(cfg.extra), mlp_only_layers=list(cfg.mlp_only_layers),
                   sliding_windows=list(cfg.sliding_windows))
