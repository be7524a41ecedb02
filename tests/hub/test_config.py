"""The one config.json reader and writer: the converter, the loader, the trainer's export and
inspect read the same values, agreeing with transformers where they used to disagree."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import DENSE_ARCHS, build_dense

from dropup import ModelConfig, UserError, load_model, save_model, upcycle
from dropup.analysis.experts import inspect_checkpoint
from dropup.hub.config import dense_to_moe
from dropup.hub.names import TARGETS_OF, dense_shape


def _hf_config(arch: str, **over) -> dict:
    cls_name, kwargs = DENSE_ARCHS[arch]
    cfg = getattr(transformers, cls_name)(vocab_size=96, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, **kwargs)
    d = cfg.to_dict()
    d.update(over)
    return d


def test_qwen3_without_head_dim_reads_transformers_default():
    d = _hf_config("qwen3")
    del d["head_dim"]
    want = transformers.Qwen3Config.from_dict(d).head_dim
    assert want == 128 != 64 // 4
    assert ModelConfig.from_hf(d).head_dim == want
    assert dense_shape(d).head_dim == want  # the converter reads it the same way


def test_swish_is_silu_for_converter_and_loader():
    d = _hf_config("llama", hidden_act="swish")
    x = torch.linspace(-6, 6, 101)
    act = transformers.activations.ACT2FN
    assert torch.equal(act["swish"](x), act["silu"](x))  # the same function to transformers
    ModelConfig.from_hf(d)
    dense_shape(d)
    with pytest.raises(UserError, match="hidden_act 'gelu'"):
        dense_shape(_hf_config("llama", hidden_act="gelu"))


def test_mistral_attention_bias_key_adds_no_bias():
    """Mistral has no attention biases whatever the config says; transformers ignores the key."""
    d = _hf_config("mistral", attention_bias=True)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig.from_dict(d))
    assert model.model.layers[0].self_attn.q_proj.bias is None
    shape = dense_shape(d)
    assert not shape.qkv_bias and not shape.o_bias
    assert "model.layers.0.self_attn.q_proj.bias" not in shape.all_tensors()


def test_missing_key_is_one_user_error_for_every_reader():
    d = _hf_config("llama")
    del d["hidden_size"]
    for read in (ModelConfig.from_hf, dense_shape):
        with pytest.raises(UserError, match="no 'hidden_size'"):
            read(d)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "granite"])
def test_converter_and_export_write_the_same_config(dense_models, tmp_path, arch):
    """The converter's config.json, read back and written by save_model (what the trainer's export
    does), is the same file apart from the version stamp: one writer."""
    for target in TARGETS_OF[arch]:
        out = tmp_path / f"{arch}-{target}"
        upcycle(dense_models[arch], out, method="naive", target=target, num_experts=4, progress=False)
        save_model(load_model(out), tmp_path / "export")
        a = json.loads((out / "config.json").read_text())
        b = json.loads((tmp_path / "export" / "config.json").read_text())
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert (out / "config.json").read_text() == (tmp_path / "export" / "config.json").read_text()


def test_export_keeps_rope_for_transformers_4(tmp_path):
    """A rope_parameters (transformers 5) config is exported with rope_theta / rope_scaling too:
    transformers 4.x reads only those (and Mixtral would fall back to theta 1e6 without them)."""
    src = build_dense(tmp_path / "llama", "llama")  # linear RoPE scaling, factor 2
    moe = dense_to_moe(ModelConfig.from_hf(json.loads((src / "config.json").read_text())), "mixtral",
                       num_experts=4, top_k=2, aux_loss_coef=0.02)
    d = moe.to_hf()
    assert d["rope_theta"] == 10000.0
    assert d["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert d["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}
    assert ModelConfig.from_hf(d).to_hf() == d  # reading and writing again changes nothing


def test_inspect_reads_through_the_same_reader(dense_models, tmp_path):
    out = tmp_path / "moe"
    upcycle(dense_models["qwen3"], out, method="naive", num_experts=4, top_k=2, progress=False)
    cfg = ModelConfig.from_hf(json.loads((out / "config.json").read_text()))
    r = inspect_checkpoint(out, similarity=False)
    assert (r["num_experts"], r["top_k"], r["expert_intermediate_size"]) == (
        cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size)


@pytest.mark.parametrize("key, value", [("hidden_size", "32"), ("num_hidden_layers", 2.0),
                                        ("num_attention_heads", -4), ("vocab_size", True)])
def test_sizes_that_are_not_positive_integers_are_one_line(key, value):
    d = _hf_config("llama", **{key: value})
    for read in (ModelConfig.from_hf, dense_shape):
        with pytest.raises(UserError, match=f"config.json '{key}' must be"):
            read(d)


@pytest.mark.parametrize("value", [None, "2", True, float("inf")])
def test_a_granite_multiplier_that_is_not_a_number_is_one_line(value):
    d = _hf_config("granite", logits_scaling=value)
    for read in (ModelConfig.from_hf, dense_shape):
        with pytest.raises(UserError, match="config.json 'logits_scaling' is .*, not a number"):
            read(d)
