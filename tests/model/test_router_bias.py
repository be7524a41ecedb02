"""The selection bias of aux-loss-free balancing in the model: it picks the experts and never
weights them, it is a buffer outside the state dict, and it travels in its own file beside a
saved checkpoint that dropup's loader applies and transformers ignores."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from dropup.analysis.routing import expert_counts
from dropup.errors import UserError
from dropup.hub.config import ModelConfig
from dropup.hub.names import router_bias_name
from dropup.model.decoder import MoE, build_model, selection_biases
from dropup.model.io import ROUTER_BIAS_FILE, load_model, save_model
from dropup.train.optim import param_groups

torch.set_num_threads(1)


def _moe_config(model_type: str = "mixtral", norm_topk_prob: bool = True, **extra) -> ModelConfig:
    return ModelConfig(model_type=model_type, vocab_size=40, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                       num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                       norm_topk_prob=norm_topk_prob, **extra)


def _hf(model_type: str) -> dict:
    """A tiny HF config dict; the qwen2_moe one has a dense layer (layer 0), so the file's names
    must follow the MoE layers' own indices."""
    base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if model_type == "mixtral":
        return {**base, "model_type": "mixtral", "num_local_experts": 6, "num_experts_per_tok": 2}
    return {**base, "model_type": "qwen2_moe", "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 16, "norm_topk_prob": False, "mlp_only_layers": [0]}


def _random_model(hf: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_hf(hf))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0, 0.5)  # decisive routing: the biases below flip choices, not near-ties
    return model


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_bias_picks_the_experts_and_the_weights_stay_the_probabilities(norm_topk_prob):
    torch.manual_seed(0)
    moe = MoE(_moe_config(norm_topk_prob=norm_topk_prob))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(50, 32)
    assert torch.equal(moe.selection_bias, torch.zeros(6))
    # Zero bias: the plain top-k, ids and weights bit for bit.
    logits, w0, ids0 = moe.route(x)
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(ids0, top.indices)
    plain = top.values / top.values.sum(-1, keepdim=True) if norm_topk_prob else top.values
    assert torch.equal(w0, plain)
    # A bias that sends every token to experts 4 and 5: the weights are those experts' unbiased
    # probabilities (renormalised where the architecture renormalises), not the biased scores.
    moe.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 1.0]))
    _, w, ids = moe.route(x)
    assert (ids == torch.tensor([4, 5])).all()
    assert not torch.equal(ids, ids0)
    chosen = probs[:, 4:6]
    want = chosen / chosen.sum(-1, keepdim=True) if norm_topk_prob else chosen
    assert torch.allclose(w, want, atol=1e-6, rtol=0)
    # The routing counts of training and analysis follow the same choice.
    counts = expert_counts([logits], 2, 6, biases=[moe.selection_bias])
    assert counts.tolist() == [[0, 0, 0, 0, 50, 50]]
    # The MoE's output is the biased choice weighted by those probabilities.
    out = moe(x)
    assert torch.allclose(out, moe.run_experts(x, want, ids), atol=1e-6)


def test_bias_is_a_buffer_outside_parameters_state_dict_and_optimizer():
    model = _random_model(_hf("qwen2_moe"))
    biases = selection_biases(model)
    assert len(biases) == 2 and all(torch.equal(b, torch.zeros(6)) for b in biases)
    assert not any("selection_bias" in n for n, _ in model.named_parameters())
    assert not any("selection_bias" in n for n in model.state_dict())
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert not any(id(b) in grouped for b in biases) and not any(b.requires_grad for b in biases)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_saved_bias_is_loaded_back_and_transformers_ignores_it(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    model = _random_model(_hf(model_type))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in selection_biases(model):
            b.copy_(torch.randint(-8, 9, (6,), generator=gen).float() * 2**-4)
    save_model(model, tmp_path / "m", dtype=torch.bfloat16)
    file = tmp_path / "m" / ROUTER_BIAS_FILE
    layers = [i for i, layer in enumerate(model.model.layers) if layer.is_moe]
    with safe_open(str(file), "pt") as f:
        assert sorted(f.keys()) == sorted(router_bias_name(model_type, i) for i in layers)
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # not the export dtype
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert not any("e_score_correction_bias" in k for k in f.keys())  # the weights have no slot for it

    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = load_model(tmp_path / "m", dtype=torch.float32)
    for a, b in zip(selection_biases(ours), selection_biases(model)):
        assert torch.equal(a, b)
    with torch.no_grad():
        want = model.to(torch.bfloat16).float()(ids)  # the saved (bf16-rounded) weights, biased routing
        got = ours(ids)
        assert torch.allclose(got, want, atol=1e-5)
        # Without the file the routing, and so the logits, differ ...
        shutil.copytree(tmp_path / "m", tmp_path / "plain", ignore=shutil.ignore_patterns("dropup"))
        plain = load_model(tmp_path / "plain", dtype=torch.float32)
        assert all(not b.any() for b in selection_biases(plain))
        assert (plain(ids) - got).abs().max() > 1e-3
        # ... and transformers, which ignores the file, computes the unbiased model.
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
        assert (hf(ids).logits - plain(ids)).abs().max() < 1e-4

    # Saving over it replaces the biases whole ...
    with torch.no_grad():
        selection_biases(ours)[-1][0] += 2**-4
    save_model(ours, tmp_path / "m")
    assert torch.equal(selection_biases(load_model(tmp_path / "m"))[-1], selection_biases(ours)[-1])
    # ... and a model without biases removes the stale file, which would route the new weights.
    save_model(plain, tmp_path / "m")
    assert not (tmp_path / "m" / "dropup").exists()
    assert all(not b.any() for b in selection_biases(load_model(tmp_path / "m")))


def test_a_bias_file_that_does_not_fit_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    model = _random_model(_hf("mixtral"))
    selection_biases(model)[0][0] = 0.25
    save_model(model, tmp_path / "m")
    file = tmp_path / "m" / ROUTER_BIAS_FILE
    names = [router_bias_name("mixtral", i) for i in range(3)]
    save_file({n: torch.zeros(5) for n in names}, str(file))  # E = 6 in the config
    with pytest.raises(UserError, match=r"router_bias.safetensors does not match .*config.json.*float32 \[6\]"):
        load_model(tmp_path / "m")
    save_file({n: torch.zeros(6) for n in names[:2]}, str(file))  # a layer missing
    with pytest.raises(UserError, match="tensor model.layers.2.block_sparse_moe.gate.e_score_correction_bias"):
        load_model(tmp_path / "m")
    file.write_bytes(b"\x00" * 5)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_model(tmp_path / "m")
