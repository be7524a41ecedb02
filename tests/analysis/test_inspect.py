"""dropup inspect and --verify."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tensors

from dropup import UserError, upcycle
from dropup.analysis.experts import inspect_checkpoint
from dropup.cli import main
from dropup.convert.verify import verify


def test_inspect_reports_method_params_and_similarity(wide_llama, tmp_path, capsys):
    upcycle(wide_llama, tmp_path / "drop", ratio=0.5, progress=False)
    upcycle(wide_llama, tmp_path / "naive", method="naive", progress=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "drop")
    r = inspect_checkpoint(tmp_path / "drop")
    assert r["total_params"] == sum(p.numel() for p in model.parameters())
    per_expert = 3 * 64 * 320
    assert r["active_params"] == r["total_params"] - 2 * 6 * per_expert
    assert r["architecture"] == "mixtral" and r["num_experts"] == 8 and r["top_k"] == 2
    u = r["upcycling"]
    assert u["method"] == "drop" and u["ratio"] == 0.5 and u["intact_fraction_mean"] == 0.5
    for s in r["similarity"]:
        # two experts each keep half the neurons: a quarter are kept by both
        assert 0.15 < s["mean_identical_neurons"] < 0.35
        assert s["mean_cosine"] < 0.9
    naive = inspect_checkpoint(tmp_path / "naive")
    assert all(s["mean_identical_neurons"] == 1.0 for s in naive["similarity"])
    assert all(s["min_cosine"] == pytest.approx(1.0) for s in naive["similarity"])

    assert main(["inspect", str(tmp_path / "drop")]) == 0
    text = capsys.readouterr().out
    for needle in ("mixtral", "8 routed, top-2", "active per token", "drop (r = 0.5, shared indices",
                   "intact       0.5000", "identical neurons"):
        assert needle in text
    assert main(["inspect", str(tmp_path / "drop"), "--json", "--no-similarity"]) == 0
    assert json.loads(capsys.readouterr().out)["active_params"] == r["active_params"]


def test_inspect_rejects_dense(wide_llama, capsys):
    assert main(["inspect", str(wide_llama)]) == 2
    assert "not an MoE" in capsys.readouterr().err


def test_verify_catches_tensors_transformers_would_ignore(dense_models, tmp_path):
    """A misnamed expert is what silently breaks other converters under transformers 5."""
    out = tmp_path / "moe"
    prov = upcycle(dense_models["mistral"], out, method="naive", verify=True, progress=False)
    assert prov["verify"]["matches_dense"] and prov["verify"]["max_abs_logit_diff"] <= 1e-5
    from safetensors.torch import save_file

    t = load_tensors(out)
    t["model.layers.0.block_sparse_moe.experts.3.w4.weight"] = t.pop(
        "model.layers.0.block_sparse_moe.experts.3.w1.weight")
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="did not load"):
        verify(dense_models["mistral"], out)


def test_verify_catches_wrong_values(dense_models, tmp_path):
    out = tmp_path / "moe"
    upcycle(dense_models["qwen3"], out, method="naive", progress=False)
    from safetensors.torch import save_file

    t = load_tensors(out)
    t["model.layers.1.mlp.experts.0.up_proj.weight"] += 0.5
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    # Expert 0 is picked for some tokens whatever the router does, so the logits must move.
    with pytest.raises(UserError, match="logits differ"):
        verify(dense_models["qwen3"], out)


def test_verify_failure_leaves_no_output(dense_models, tmp_path, monkeypatch, capsys):
    import dropup.convert.verify as v

    def broken(*a, **k):
        raise UserError("verify: simulated failure")

    monkeypatch.setattr(v, "verify", broken)
    code = main(["upcycle", str(dense_models["llama"]), str(tmp_path / "out"), "--verify"])
    assert code == 2 and "simulated failure" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _reference_similarity(tensors: dict, layer: int, num_experts: int):
    """Pair by pair, neuron by neuron, in float64: the definition the fast path must match."""
    def expert(e):
        p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
        return tensors[p + "w1.weight"], tensors[p + "w3.weight"], tensors[p + "w2.weight"]

    cos = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    same = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for i in range(num_experts):
        for j in range(num_experts):
            a, b = expert(i), expert(j)
            va = torch.cat([t.double().reshape(-1) for t in a])
            vb = torch.cat([t.double().reshape(-1) for t in b])
            cos[i, j] = va @ vb / (va.norm() * vb.norm())
            bits = [torch.equal(a[0][n], b[0][n]) and torch.equal(a[1][n], b[1][n])
                    and torch.equal(a[2][:, n], b[2][:, n]) for n in range(a[0].shape[0])]
            same[i, j] = sum(bits) / len(bits)
    return cos, same


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_similarity_equals_pairwise_reference(wide_llama, tmp_path, dtype, monkeypatch):
    from dropup.analysis import experts
    from dropup.hub.safetensors import CheckpointReader

    out = tmp_path / "drop"
    upcycle(wide_llama, out, ratio=0.5, dtype=dtype, progress=False)
    tensors = load_tensors(out)
    # a small budget forces several neuron blocks, as a large model would need
    monkeypatch.setattr(experts, "SIMILARITY_BUDGET", 8 * 64 * 100)
    ck = CheckpointReader(out)
    for layer in range(2):
        fast = experts.layer_similarity(ck, "mixtral", layer, 8)
        cos, same = _reference_similarity(tensors, layer, 8)
        assert torch.allclose(fast.cosine, cos, rtol=0, atol=1e-6)
        assert torch.equal(fast.identical, same)
        assert 0.1 < same[0, 1] < 0.4  # drop: the test compares partly identical experts
