"""Gentler re-initialisation for drop (issue 15, item 7): --reinit-scale and --reinit-down zeros."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_tensors, upcycle_refused
from test_upcycle import _changed_neurons, _digest, _expert, _ffn, _hf, _logits

from dropup import UserError, upcycle
from dropup.analysis.experts import format_report, inspect_checkpoint
from dropup.convert import surgery
from dropup.hub import names as archs


def _run(src, out, **kw):
    return upcycle(src, out, progress=False, **kw)


def test_defaults_and_scale_one_are_the_paper_bit_for_bit(wide_llama, tmp_path):
    default = _run(wide_llama, tmp_path / "default", num_experts=4)
    explicit = _run(wide_llama, tmp_path / "explicit", num_experts=4, reinit_scale=1.0, reinit_down="drawn")
    assert _digest(tmp_path / "default") == _digest(tmp_path / "explicit")
    assert (tmp_path / "default" / "upcycling.json").read_bytes().replace(b"default", b"X").split(b'"seconds"')[0] \
        == (tmp_path / "explicit" / "upcycling.json").read_bytes().replace(b"explicit", b"X").split(b'"seconds"')[0]
    # options left at their default are not recorded: the records of before stay as they were
    assert "reinit_scale" not in default["options"] and "reinit_down" not in explicit["options"]


def test_scale_multiplies_the_standard_deviation_of_the_drawn_values():
    gen = torch.Generator().manual_seed(0)
    dense = 0.01 + 0.05 * torch.randn(2048, 96, generator=gen)
    idx = surgery.sample_indices(2048, 0.5, gen)
    stats = surgery.reinit_stats(dense, "gate", idx, "slice")
    key = surgery.derive_seed(0, "values", 0, 0, "gate")
    base = surgery.drop_reinit(dense, "gate", idx, stats, key)
    assert torch.equal(surgery.drop_reinit(dense, "gate", idx, stats.scaled(1.0), key), base)
    new_base = surgery.take_neurons(base, "gate", idx).double()
    for s in (0.5, 0.1, 2.0):
        out = surgery.drop_reinit(dense, "gate", idx, stats.scaled(s), key)
        keep = torch.ones(2048, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(out[keep], dense[keep])
        new = surgery.take_neurons(out, "gate", idx).double()
        # statistically: 98,304 values, so the sample std is within 1% of S times the slice's
        assert new.std().item() == pytest.approx(s * stats.std, rel=0.01)
        assert abs(new.mean().item() - stats.mean) < 4 * s * stats.std / math.sqrt(new.numel())
        # and exactly: the same standard normal draws, S times as far from the mean (float32 rounding)
        torch.testing.assert_close(new - stats.mean, s * (new_base - stats.mean), rtol=1e-5, atol=1e-7)


def test_scale_is_recorded_and_applied_by_upcycle(wide_llama, tmp_path):
    prov = _run(wide_llama, tmp_path / "moe", num_experts=2, reinit_scale=0.25)
    ref = _run(wide_llama, tmp_path / "ref", num_experts=2)
    assert prov["options"]["reinit_scale"] == 0.25
    moe, dense = load_tensors(tmp_path / "moe"), _ffn(load_tensors(wide_llama), 1)
    ex = _expert(moe, "mixtral", 1, 1)
    for m, axis in (("gate", 0), ("up", 0), ("down", 1)):
        idx = _changed_neurons(ex[m], dense[m], m)
        assert len(idx) == 160  # the same neurons as without the scale
        rec, base = prov["layers"][1][1][m], ref["layers"][1][1][m]
        assert rec["mean"] == base["mean"] and rec["std"] == pytest.approx(0.25 * base["std"], rel=1e-12)
        assert ex[m].index_select(axis, idx).double().std().item() == pytest.approx(rec["std"], rel=0.05)
    r = inspect_checkpoint(tmp_path / "moe", similarity=False)
    assert r["upcycling"]["reinit_scale"] == 0.25
    assert "re-drawn std x 0.25" in format_report(r)


def test_silent_down_zeroes_the_redrawn_columns_only(wide_llama, tmp_path):
    prov = _run(wide_llama, tmp_path / "silent", num_experts=4, reinit_down="zeros")
    _run(wide_llama, tmp_path / "drawn", num_experts=4)
    silent, drawn = load_tensors(tmp_path / "silent"), load_tensors(tmp_path / "drawn")
    dense = load_tensors(wide_llama)
    for layer in range(2):
        base = _ffn(dense, layer)
        for e in range(4):
            ex, ref = _expert(silent, "mixtral", layer, e), _expert(drawn, "mixtral", layer, e)
            # gate and up are drop's own, bit for bit: down's zeros take no draws of theirs
            assert torch.equal(ex["gate"], ref["gate"]) and torch.equal(ex["up"], ref["up"])
            idx = _changed_neurons(ex["gate"], base["gate"], "gate")
            keep = torch.ones(320, dtype=torch.bool)
            keep[idx] = False
            assert len(idx) == 160
            assert torch.count_nonzero(ex["down"][:, idx]) == 0
            assert torch.equal(ex["down"][:, keep], base["down"][:, keep])
            assert prov["layers"][layer][e]["down"] == {"reinit_fraction": 0.5, "mean": 0.0, "std": 0.0}
    assert prov["options"]["reinit_down"] == "zeros"
    assert "re-drawn down columns zero" in format_report(inspect_checkpoint(tmp_path / "silent", similarity=False))


def _dense_with_down(src, out, scale_of_layer):
    """SRC with each layer's down_proj columns multiplied by ``scale_of_layer(layer)`` ([d_f])."""
    model = _hf(src)
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            block.mlp.down_proj.weight.mul_(scale_of_layer(layer)[None, :])
    model.save_pretrained(out)
    return _hf(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_silent_down_with_uniform_routing_is_the_dense_ffn_reweighted(dense_models, tmp_path, arch):
    """What the MoE computes at step 0 with silent re-drawn neurons: expert e is the dense FFN
    restricted to the neurons K_e it kept, so the MoE is sum_e w_e(x) FFN_{K_e}(x). With a zero
    router and k = E every weight is 1/E, and that is the dense FFN with neuron j's down column
    scaled by c_j / E, c_j the number of experts that kept j (about 1 - r on average)."""
    src, experts = dense_models[arch], 4
    _run(src, tmp_path / "moe", method="drop", ratio=0.5, num_experts=experts, top_k=experts,
         router_init="zeros", reinit_down="zeros")
    moe_t = load_tensors(tmp_path / "moe")
    target = archs.TARGETS_OF[arch][0]

    def kept_share(layer):
        kept = sum((_expert(moe_t, target, layer, e)["down"] != 0).any(0).double() for e in range(experts))
        return (kept / experts).float()

    shares = torch.stack([kept_share(layer) for layer in range(2)])
    assert 0.3 < shares.mean().item() < 0.7 and shares.min().item() < 1.0  # neurons really were silenced
    reweighted = _dense_with_down(src, tmp_path / "reweighted", kept_share)
    moe = _hf(tmp_path / "moe")
    diff = (_logits(moe) - _logits(reweighted)).abs().max().item()
    assert diff <= 1e-5, diff
    assert (_logits(moe) - _logits(_hf(src))).abs().max().item() > 1e-2  # and it is not the dense model


def test_silent_down_at_r_one_removes_every_ffn(dense_models, tmp_path):
    """r = 1 with silent down: every expert outputs zero, whatever the routing, so the MoE is the
    dense model without its FFNs."""
    src = dense_models["llama"]
    _run(src, tmp_path / "moe", method="drop", ratio=1.0, reinit_down="zeros", router_init="normal",
         router_std=0.5)
    no_ffn = _dense_with_down(src, tmp_path / "no_ffn", lambda layer: torch.zeros(64))
    diff = (_logits(_hf(tmp_path / "moe")) - _logits(no_ffn)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("args, says", [
    (["--reinit-scale", "0"], "--reinit-scale must be > 0, got 0.0"),
    (["--reinit-scale", "nan"], "--reinit-scale must be a finite number, got nan"),
    (["--reinit-scale", "0.5", "--method", "noise"],
     "--reinit-scale changes how drop re-draws neurons; --method noise does not use it"),
    (["--reinit-down", "zeros", "--method", "naive"], "--reinit-down changes how drop re-draws neurons"),
])
def test_bad_reinit_options(capsys, dense_models, tmp_path, args, says):
    upcycle_refused(capsys, dense_models["llama"], tmp_path, args, says)


def test_bad_reinit_options_from_python(dense_models, tmp_path):
    for bad, says in ((dict(reinit_down="ones"), "--reinit-down 'ones' is not one of: drawn, zeros"),
                      (dict(reinit_scale=-1), "--reinit-scale must be > 0, got -1"),
                      (dict(reinit_scale="0.5"), "--reinit-scale must be a number")):
        with pytest.raises(UserError, match=says):
            _run(dense_models["llama"], tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def test_provenance_reads_back(wide_llama, tmp_path):
    prov = _run(wide_llama, tmp_path / "moe", num_experts=2, reinit_scale=0.5, reinit_down="zeros",
                ratio="linear:0.25:0.75")
    on_disk = json.loads((tmp_path / "moe" / "upcycling.json").read_text())
    assert on_disk["options"]["reinit_scale"] == 0.5 and on_disk["options"]["reinit_down"] == "zeros"
    assert on_disk["options"]["ratio"] == "linear:0.25:0.75" and on_disk["ratio_per_layer"] == [0.25, 0.75]
    assert prov["layers"][0][0]["gate"]["reinit_fraction"] == 0.25
    assert prov["layers"][1][0]["gate"]["reinit_fraction"] == 0.75
