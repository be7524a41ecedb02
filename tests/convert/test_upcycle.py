"""dropup upcycle: exactness against transformers, the methods' definitions, determinism."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DENSE_ARCHS, build_dense, expert_weight, load_tensors

from dropup import upcycle
from dropup.convert.surgery import num_reinit
from dropup.hub import names as archs

SEQ = 40  # longer than the mistral fixture's sliding window of 8


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _logits(model, seed=0):
    tokens = torch.randint(0, model.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens).logits


def _run(src, out, **kw):
    kw.setdefault("progress", False)
    return upcycle(src, out, **kw)


def _ffn(dense: dict, layer: int) -> dict[str, torch.Tensor]:
    return {m: dense[f"model.layers.{layer}.mlp.{m}_proj.weight"] for m in ("gate", "up", "down")}


def _expert(moe: dict, target: str, layer: int, e: int) -> dict[str, torch.Tensor]:
    return {m: expert_weight(moe, target, layer, e, m) for m in ("gate", "up", "down")}


def _changed_neurons(new: torch.Tensor, old: torch.Tensor, matrix: str) -> torch.Tensor:
    diff = new != old
    return (diff.any(dim=1) if matrix != "down" else diff.any(dim=0)).nonzero().flatten()


# ------------------------------------------------------------------------------------------
# exactness against transformers


@pytest.mark.parametrize("arch", list(DENSE_ARCHS))
@pytest.mark.parametrize("method", ["naive", "drop-r0"])
def test_function_preserving_methods_give_dense_logits(dense_models, tmp_path, arch, method):
    src = dense_models[arch]
    opts = dict(method="naive") if method == "naive" else dict(method="drop", ratio=0.0)
    prov = _run(src, tmp_path / "moe", **opts)
    moe = _hf(tmp_path / "moe")
    assert moe.config.model_type == archs.TARGETS_OF[json.loads((src / "config.json").read_text())["model_type"]][0]
    assert prov["target"] == moe.config.model_type
    diff = (_logits(moe) - _logits(_hf(src))).abs().max().item()
    assert diff <= 1e-5, diff


def test_hub_tensor_names(dense_models, tmp_path):
    _run(dense_models["llama"], tmp_path / "mixtral", method="naive")
    _run(dense_models["qwen2"], tmp_path / "qwen2moe", method="naive")
    mix = load_tensors(tmp_path / "mixtral")
    for m in ("w1", "w2", "w3"):
        assert f"model.layers.1.block_sparse_moe.experts.7.{m}.weight" in mix
    assert "model.layers.0.block_sparse_moe.gate.weight" in mix
    q = load_tensors(tmp_path / "qwen2moe")
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in q
    assert "model.layers.0.mlp.gate.weight" in q
    assert "model.layers.0.mlp.shared_expert_gate.weight" in q
    assert "lm_head.weight" not in q  # qwen2 fixture ties embeddings
    assert not any("gate_up_proj" in k for k in mix)


def test_granitemoe_stacks_the_experts_the_hub_way(dense_models, tmp_path):
    """GraniteMoE's Hub layout: input_linear [E, 2 d_f, d_h] = gate and up of each expert stacked,
    output_linear [E, d_h, d_f] = down, router.layer [E, d_h]; the multipliers carried over."""
    src = dense_models["granite"]
    _run(src, tmp_path / "moe", method="naive", num_experts=4)
    t, dense = load_tensors(tmp_path / "moe"), load_tensors(src)
    p = "model.layers.1.block_sparse_moe."
    assert t[p + "input_linear.weight"].shape == (4, 128, 32) and t[p + "output_linear.weight"].shape == (4, 32, 64)
    assert t[p + "router.layer.weight"].shape == (4, 32)
    assert not any(".experts." in k or ".mlp." in k for k in t)
    for e in range(4):
        assert torch.equal(t[p + "input_linear.weight"][e], torch.cat([dense["model.layers.1.mlp.gate_proj.weight"],
                                                                       dense["model.layers.1.mlp.up_proj.weight"]]))
        assert torch.equal(t[p + "output_linear.weight"][e], dense["model.layers.1.mlp.down_proj.weight"])
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        assert cfg[key] == src_cfg[key] != 1.0, key
    # inspect reads the stacked layout: identical experts, parameters as transformers counts them
    from dropup.analysis.experts import inspect_checkpoint

    r = inspect_checkpoint(tmp_path / "moe", progress=False)
    assert [s["mean_identical_neurons"] for s in r["similarity"]] == [1.0, 1.0]
    assert r["total_params"] == sum(p.numel() for p in _hf(tmp_path / "moe").parameters())
    _run(src, tmp_path / "drop", method="drop", ratio=0.5, num_experts=4)
    sim = inspect_checkpoint(tmp_path / "drop", progress=False)["similarity"]
    assert all(0.1 < s["mean_identical_neurons"] < 0.4 for s in sim)  # about (1 - r)^2 = 0.25


@pytest.mark.parametrize("method", ["drop", "noise", "scratch"])
def test_stacked_experts_equal_per_expert_ones(dense_models, tmp_path, method):
    """Each method builds an expert the same way whether it is written on its own or as a slice
    of GraniteMoE's stacked tensors: the granite source read as a llama (same tensors) gives
    qwen3_moe experts bit-identical to the granitemoe slices."""
    import shutil

    src = dense_models["granite"]
    as_llama = tmp_path / "as-llama"
    shutil.copytree(src, as_llama)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (as_llama / "config.json").write_text(json.dumps(cfg))
    kw = dict(method=method, ratio=0.5, num_experts=4, seed=5, dtype="bfloat16")
    _run(src, tmp_path / "stacked", **kw)
    _run(as_llama, tmp_path / "per-expert", target="qwen3_moe", **kw)
    a, b = load_tensors(tmp_path / "stacked"), load_tensors(tmp_path / "per-expert")
    for layer in range(2):
        for e in range(4):
            x, y = _expert(a, "granitemoe", layer, e), _expert(b, "qwen3_moe", layer, e)
            assert all(x[m].dtype == torch.bfloat16 and torch.equal(x[m], y[m]) for m in x), (layer, e)


def test_qwen2_moe_shared_expert_starts_silent(dense_models, tmp_path):
    _run(dense_models["qwen2"], tmp_path / "moe", method="drop", ratio=0.5)
    t = load_tensors(tmp_path / "moe")
    dense = load_tensors(dense_models["qwen2"])
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        assert torch.count_nonzero(t[p + "shared_expert.down_proj.weight"]) == 0
        assert torch.equal(t[p + "shared_expert.gate_proj.weight"], dense[p + "gate_proj.weight"])
        assert t[p + "shared_expert_gate.weight"].shape == (1, 32)


def test_llama_to_qwen3_moe_loads_with_unit_qk_norms(dense_models, tmp_path):
    prov = _run(dense_models["llama"], tmp_path / "moe", method="naive", target="qwen3_moe", verify=True)
    assert prov["function_preserving_target"] is False
    assert prov["verify"]["loaded_cleanly"] and "matches_dense" not in prov["verify"]
    t = load_tensors(tmp_path / "moe")
    assert torch.equal(t["model.layers.0.self_attn.q_norm.weight"], torch.ones(8))


@pytest.mark.parametrize("arch", list(DENSE_ARCHS))
def test_scratch_has_expected_parameters(dense_models, tmp_path, arch):
    src = dense_models[arch]
    _run(src, tmp_path / "moe", method="scratch", num_experts=4)
    moe, dense = _hf(tmp_path / "moe"), _hf(src)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ffn = 3 * 32 * 64
    extra_per_layer = 3 * ffn + 4 * 32  # 3 more experts and the router
    if arch == "qwen2":
        extra_per_layer += ffn + 32  # shared expert and its gate
    assert n(moe) == n(dense) + 2 * extra_per_layer
    t = load_tensors(tmp_path / "moe")
    assert torch.equal(t["model.norm.weight"], torch.ones(32))
    target = archs.TARGETS_OF[arch.removesuffix("-tied")][0]
    w = torch.cat([expert_weight(t, target, 1, e, "up").flatten() for e in range(4)])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    dense_t = load_tensors(src)
    assert not torch.equal(t["model.embed_tokens.weight"], dense_t["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------
# the methods' definitions


@pytest.mark.parametrize("ratio", [0.3, 0.5, 1.0])
def test_drop_shared_replaces_whole_neurons(wide_llama, tmp_path, ratio):
    prov = _run(wide_llama, tmp_path / "moe", method="drop", ratio=ratio, num_experts=4)
    moe, dense = load_tensors(tmp_path / "moe"), load_tensors(wide_llama)
    d_f, n = 320, num_reinit(320, ratio)
    for layer in range(2):
        base = _ffn(dense, layer)
        sets = []
        for e in range(4):
            ex = _expert(moe, "mixtral", layer, e)
            changed = {m: _changed_neurons(ex[m], base[m], m) for m in ex}
            assert all(len(c) == n for c in changed.values())
            assert torch.equal(changed["gate"], changed["up"]) and torch.equal(changed["gate"], changed["down"])
            keep = torch.ones(d_f, dtype=torch.bool)
            keep[changed["gate"]] = False
            assert torch.equal(ex["gate"][keep], base["gate"][keep])
            assert torch.equal(ex["down"][:, keep], base["down"][:, keep])
            sets.append(set(changed["gate"].tolist()))
            rec = prov["layers"][layer][e]
            assert rec["intact_fraction"] == pytest.approx(1 - n / d_f)
            for m, axis in (("gate", 0), ("up", 0), ("down", 1)):
                idx = changed[m]
                new = ex[m].index_select(axis, idx).double()
                old = base[m].index_select(axis, idx).double()
                # statistics of the replaced slice (the default), recorded and honoured
                assert rec[m]["mean"] == pytest.approx(old.mean().item(), abs=1e-9)
                assert rec[m]["std"] == pytest.approx(old.std().item(), rel=1e-6)
                tol = 4 * rec[m]["std"] / math.sqrt(new.numel())
                assert abs(new.mean().item() - rec[m]["mean"]) < tol
                assert new.std().item() == pytest.approx(rec[m]["std"], rel=0.05)
        if ratio < 1.0:
            assert len({frozenset(s) for s in sets}) == 4  # every expert drew its own set


def test_drop_per_matrix_draws_three_sets(wide_llama, tmp_path):
    prov = _run(wide_llama, tmp_path / "moe", method="drop", ratio=0.5, num_experts=2,
                index_sampling="per-matrix")
    moe, dense = load_tensors(tmp_path / "moe"), load_tensors(wide_llama)
    base = _ffn(dense, 0)
    ex = _expert(moe, "mixtral", 0, 1)
    changed = {m: set(_changed_neurons(ex[m], base[m], m).tolist()) for m in ex}
    assert all(len(c) == 160 for c in changed.values())
    assert changed["gate"] != changed["up"] and changed["up"] != changed["down"]
    intact = 1 - len(changed["gate"] | changed["up"] | changed["down"]) / 320
    assert prov["layers"][0][1]["intact_fraction"] == pytest.approx(intact)


def test_drop_matrix_statistics(wide_llama, tmp_path):
    prov = _run(wide_llama, tmp_path / "moe", method="drop", num_experts=2, reinit_stats="matrix")
    dense = load_tensors(wide_llama)
    w = dense["model.layers.1.mlp.down_proj.weight"].double()
    rec = prov["layers"][1][0]["down"]
    assert rec["mean"] == pytest.approx(w.mean().item(), abs=1e-12)
    assert rec["std"] == pytest.approx(w.std().item(), rel=1e-9)


def test_noise_is_additive_on_the_selected_neurons(wide_llama, tmp_path):
    _run(wide_llama, tmp_path / "moe", method="noise", ratio=0.5, noise_std=0.05, num_experts=2)
    moe, dense = load_tensors(tmp_path / "moe"), load_tensors(wide_llama)
    base = _ffn(dense, 0)
    ex = _expert(moe, "mixtral", 0, 0)
    changed = _changed_neurons(ex["gate"], base["gate"], "gate")
    assert len(changed) == 160
    for m, axis in (("gate", 0), ("up", 0), ("down", 1)):
        assert torch.equal(_changed_neurons(ex[m], base[m], m), changed)
        delta = (ex[m] - base[m]).index_select(axis, changed).double()
        assert abs(delta.mean().item()) < 4 * 0.05 / math.sqrt(delta.numel())
        assert delta.std().item() == pytest.approx(0.05, rel=0.05)
        # additive: the perturbed values stay correlated with the originals
        old = base[m].index_select(axis, changed).double().flatten()
        new = ex[m].index_select(axis, changed).double().flatten()
        assert torch.corrcoef(torch.stack([old, new]))[0, 1] > 0.8


def test_btx_experts_and_merged_tensors(tmp_path):
    srcs = [build_dense(tmp_path / f"s{i}", "llama", seed=i) for i in range(4)]
    _run(srcs[0], tmp_path / "moe", method="btx", sources=[str(s) for s in srcs[1:]])
    moe = load_tensors(tmp_path / "moe")
    dense = [load_tensors(s) for s in srcs]
    for layer in range(2):
        for e in range(8):
            ex = _expert(moe, "mixtral", layer, e)
            src_ffn = _ffn(dense[e * 4 // 8], layer)
            assert all(torch.equal(ex[m], src_ffn[m]) for m in ex)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.input_layernorm.weight", "lm_head.weight"):
        mean = sum(d[name] for d in dense) / 4
        torch.testing.assert_close(moe[name], mean, atol=1e-7, rtol=0)


@pytest.mark.parametrize("init", ["uniform", "normal", "zeros"])
def test_router_init(wide_llama, tmp_path, init):
    _run(wide_llama, tmp_path / "moe", method="naive", router_init=init, router_std=0.05)
    r = torch.cat([load_tensors(tmp_path / "moe")[archs.router_name("mixtral", i)].flatten() for i in range(2)])
    if init == "zeros":
        assert torch.count_nonzero(r) == 0
        return
    assert r.std().item() == pytest.approx(0.05, rel=0.1)
    assert abs(r.mean().item()) < 0.01
    if init == "uniform":
        assert r.abs().max().item() <= 0.05 * math.sqrt(3) + 1e-7


def test_dtype_cast_and_config(wide_llama, tmp_path):
    _run(wide_llama, tmp_path / "moe", method="drop", dtype="bfloat16", aux_loss_coef=0.01, top_k=1)
    t = load_tensors(tmp_path / "moe")
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["router_aux_loss_coef"] == 0.01
    assert cfg["num_experts_per_tok"] == 1 and cfg["num_local_experts"] == 8


# ------------------------------------------------------------------------------------------
# determinism and streaming


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_sets(wide_llama, tmp_path):
    _run(wide_llama, tmp_path / "a", seed=7, num_experts=4)
    _run(wide_llama, tmp_path / "b", seed=7, num_experts=4, threads=1)
    _run(wide_llama, tmp_path / "c", seed=8, num_experts=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    dense = _ffn(load_tensors(wide_llama), 0)
    a, c = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "c")
    sa = _changed_neurons(_expert(a, "mixtral", 0, 0)["up"], dense["up"], "up")
    sc = _changed_neurons(_expert(c, "mixtral", 0, 0)["up"], dense["up"], "up")
    assert len(sa) == len(sc) == 160 and not torch.equal(sa, sc)


def test_shard_size_changes_no_tensor(wide_llama, tmp_path):
    _run(wide_llama, tmp_path / "one", num_experts=4)
    _run(wide_llama, tmp_path / "many", num_experts=4, max_shard_size="200KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / "many" / f).is_file() for f in files)
    one, many = load_tensors(tmp_path / "one"), load_tensors(tmp_path / "many")
    assert one.keys() == many.keys()
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in one.values())
    _hf(tmp_path / "many")


def test_provenance_and_side_files(dense_models, tmp_path):
    src = dense_models["llama"]
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    prov = _run(src, tmp_path / "moe", method="drop", ratio=0.5, seed=3)
    on_disk = json.loads((tmp_path / "moe" / "upcycling.json").read_text())
    assert on_disk["options"]["ratio"] == 0.5 and on_disk["seed"] == 3
    assert on_disk["dropup_version"] and on_disk["source"]["config"]["model_type"] == "llama"
    assert (tmp_path / "moe" / "tokenizer_config.json").is_file()
    assert (tmp_path / "moe" / "generation_config.json").is_file()
    dense = load_tensors(src)
    sums = on_disk["source"]["tensor_sha256_16"]
    assert set(sums) == set(dense)
    t = dense["model.layers.1.mlp.down_proj.weight"]
    assert sums["model.layers.1.mlp.down_proj.weight"] == hashlib.sha256(
        t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    assert len(prov["layers"]) == 2 and len(prov["layers"][0]) == 8
    assert prov["layers"][0][0]["gate"]["reinit_fraction"] == 0.5


def test_pytorch_bin_source_is_read_safely(dense_models, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((dense_models["llama"] / "config.json").read_text())
    torch.save(load_tensors(dense_models["llama"]), src / "pytorch_model.bin")
    _run(src, tmp_path / "from_bin", method="drop")
    _run(dense_models["llama"], tmp_path / "from_st", method="drop")
    a, b = load_tensors(tmp_path / "from_bin"), load_tensors(tmp_path / "from_st")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("matrix", ["gate", "down"])
def test_moment_statistics_equal_direct_statistics(dtype, matrix):
    from dropup.convert import surgery

    gen = torch.Generator().manual_seed(0)
    w = (0.3 + 0.05 * torch.randn(96, 40, generator=gen)).to(dtype)
    if matrix == "down":
        w = w.t().contiguous()
    idx = surgery.sample_indices(96, 0.4, gen)
    mom = surgery.neuron_moments(w, matrix)
    for over, sel in (("slice", idx), ("matrix", None)):
        direct = surgery.reinit_stats(w, matrix, idx, over)
        fast = surgery.stats_from_moments(mom, sel)
        # float32 weights are summed in float64; bf16 ones exactly in float32 per product
        rel = 1e-12 if dtype == torch.float32 else 1e-6
        assert fast.mean == pytest.approx(direct.mean, rel=rel)
        assert fast.std == pytest.approx(direct.std, rel=rel)


@pytest.mark.slow  # two Python processes, three conversions each
def test_outputs_do_not_depend_on_a_c_compiler(wide_llama, tmp_path):
    """The numpy path of the sampler (machines without ``cc``) writes the very same bytes."""
    import os
    import subprocess
    import sys

    methods = ("drop", "noise", "scratch")
    # One process per sampler path (it is chosen once per process), converting with every method.
    code = ("import sys, dropup\nfor m in sys.argv[3:]:\n    dropup.upcycle(sys.argv[1], f'{sys.argv[2]}/{m}', "
            "num_experts=4, method=m, progress=False)")
    outs = {}
    for label, extra in (("default", {}), ("numpy", {"DROPUP_GAUSS": "numpy"})):
        out = tmp_path / label
        subprocess.run([sys.executable, "-c", code, str(wide_llama), str(out), *methods],
                       check=True, env={**os.environ, **extra})
        outs[label] = {m: _digest(out / m) for m in methods}
    assert outs["default"] == outs["numpy"]
