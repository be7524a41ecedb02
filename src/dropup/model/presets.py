"""Model shapes by name: the paper's dense models and their 8-expert top-2 MoE twins, plus a tiny
shape for CPU runs, as Hugging Face config dicts (``ModelConfig.from_hf`` reads them).

The one table of the paper's shapes: training presets, synthetic benchmark checkpoints and the
docs all read ``PAPER_SHAPES``.
"""

from __future__ import annotations

from typing import Any

_LLAMA = dict(rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
              hidden_act="silu")
PAPER_SHAPES = {  # the paper's dense models (its table of shapes)
    "152m": dict(num_hidden_layers=12, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=99584),
    "1.5b": dict(num_hidden_layers=24, hidden_size=2048, intermediate_size=7168, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=48640),
    "3.7b": dict(num_hidden_layers=28, hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                 num_key_value_heads=24, vocab_size=99584),
}
# A tiny CPU shape; its vocabulary follows the data unless model.vocab_size says otherwise.
_TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=None, max_position_embeddings=128)
_MOE = dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02)
PRESETS: dict[str, dict[str, Any]] = {}
for _name, _shape in {**PAPER_SHAPES, "tiny": _TINY}.items():
    PRESETS[f"dense-{_name}"] = {**_LLAMA, "model_type": "llama", **_shape}
    PRESETS[f"moe-{_name}" if _name == "tiny" else f"moe-8x{_name}"] = {**_LLAMA, **_MOE, **_shape}
