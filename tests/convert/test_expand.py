"""Expert expansion (an MoE SRC, --num-experts a multiple of its E), checked against
transformers' own modelling code: copies keep SRC's function at top-(k m), Drop-Upcycling
re-draws r of each child from its parent, the router-bias file follows (docs/expand.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_fails, expert_weight, load_tensors

from dropup.convert.surgery import num_reinit
from dropup.hub import names as archs
from test_upcycle import _changed_neurons, _hf, _logits, _run

E, K = 4, 2  # every source: 4 experts, top-2
# family -> (transformers config class, kwargs); every MoE family dropup writes
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=E, intermediate_size=48)),
    # a shared expert of another width; Qwen2-MoE's default routing: top-k weights not renormalised
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=E, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=40, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=E, moe_intermediate_size=48, head_dim=16,
                                         norm_topk_prob=False)),
    # renormalised, with a dense layer 0 (mlp_only_layers) of the dense width
    "qwen3_moe-mixed": ("Qwen3MoeConfig", dict(num_experts=E, moe_intermediate_size=48, head_dim=16,
                                               norm_topk_prob=True, mlp_only_layers=[0])),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=E, intermediate_size=48, embedding_multiplier=3.0,
                                            residual_multiplier=0.4, logits_scaling=2.5)),
}


def build_moe(path: Path, family: str, seed: int = 0) -> Path:
    """A tiny MoE saved by transformers, every parameter randomised (experts distinct)."""
    import transformers
    from transformers.utils import logging

    logging.disable_progress_bar()
    cls_name, kwargs = FAMILIES[family]
    kwargs = {"intermediate_size": 64, **kwargs}
    cfg = getattr(transformers, cls_name)(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, num_experts_per_tok=K, max_position_embeddings=256,
                                          **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # routers at a scale that gives clearly different routing weights
            scale = 1.0 if name.endswith(("gate.weight", "router.layer.weight")) else 0.1
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {family: build_moe(root / family, family) for family in FAMILIES}


def _experts(t: dict, target: str, layer: int, e: int) -> dict[str, torch.Tensor]:
    return {m: expert_weight(t, target, layer, e, m) for m in ("gate", "up", "down")}


def _target(family: str) -> str:
    return family.removesuffix("-mixed")


_SOURCE_LOGITS: dict[Path, torch.Tensor] = {}


def _source_logits(src: Path) -> torch.Tensor:
    """SRC's logits through transformers, once per source (the factors share them)."""
    if src not in _SOURCE_LOGITS:
        _SOURCE_LOGITS[src] = _logits(_hf(src))
    return _SOURCE_LOGITS[src]


# ------------------------------------------------------------------------------------------
# exactness against transformers


@pytest.mark.parametrize("family,m", [("mixtral", 2), ("mixtral", 4), ("qwen3_moe", 2), ("qwen3_moe", 4),
                                      ("qwen3_moe-mixed", 2), ("qwen2_moe", 2), ("qwen2_moe", 4),
                                      ("granitemoe", 2)])
def test_expansion_by_copies_gives_the_sources_logits(moe_sources, tmp_path, family, m):
    src = moe_sources[family]
    prov = _run(src, tmp_path / "big", method="naive", num_experts=E * m)
    big = _hf(tmp_path / "big")
    assert big.config.model_type == prov["target"] == _target(family)
    assert big.config.num_experts_per_tok == K * m  # the default top-k: k times the factor
    assert prov["expansion"] == {"source_experts": E, "source_top_k": K, "factor": m,
                                 "parents": [e // m for e in range(E * m)], "top_k_preserves": True}
    diff = (_logits(big) - _source_logits(src)).abs().max().item()
    assert diff <= 1e-5, diff


def test_children_are_their_parents_and_the_rest_is_kept(moe_sources, tmp_path):
    """Child e is a bit-identical copy of expert floor(e / m), its router row is its parent's;
    the shared expert, its gate and a dense layer's FFN are copied unchanged."""
    for family in ("qwen2_moe", "qwen3_moe-mixed"):
        src, target, m = moe_sources[family], _target(family), 2
        _run(src, tmp_path / family, method="naive", num_experts=E * m)
        old, new = load_tensors(src), load_tensors(tmp_path / family)
        moe_layers = [1] if family.endswith("mixed") else [0, 1]
        for layer in moe_layers:
            router = new[archs.router_name(target, layer)]
            assert torch.equal(router, old[archs.router_name(target, layer)].repeat_interleave(m, dim=0))
            for e in range(E * m):
                child, parent = _experts(new, target, layer, e), _experts(old, target, layer, e // m)
                assert all(torch.equal(child[x], parent[x]) for x in child), (family, layer, e)
        kept = [k for k in old if ".experts." not in k and not k.endswith("mlp.gate.weight")]
        assert any("shared_expert" in k for k in kept) or family.endswith("mixed")
        assert all(torch.equal(old[k], new[k]) for k in kept), family
        assert set(new) == set(kept) | {k for k in new if ".experts." in k or k.endswith("mlp.gate.weight")}


# ------------------------------------------------------------------------------------------
# Drop-Upcycling and noise on the children


@pytest.mark.parametrize("family", ["mixtral", "granitemoe"])  # one tensor per expert / stacked
def test_drop_redraws_r_of_each_child_with_its_parents_statistics(moe_sources, tmp_path, family):
    src, m, r, w = moe_sources[family], 2, 0.5, 48
    prov = _run(src, tmp_path / "big", method="drop", ratio=r, num_experts=E * m, seed=3)
    old, new = load_tensors(src), load_tensors(tmp_path / "big")
    for layer in (0, 1):
        sets = []
        for e in range(E * m):
            child, parent = _experts(new, family, layer, e), _experts(old, family, layer, e // m)
            changed = {x: _changed_neurons(child[x], parent[x], x) for x in child}
            assert all(len(c) == num_reinit(w, r) for c in changed.values()), (layer, e)
            assert torch.equal(changed["gate"], changed["up"]) and torch.equal(changed["gate"], changed["down"])
            sets.append(changed["gate"])
            rec = prov["layers"][layer][e]
            assert rec["intact_fraction"] == 1 - num_reinit(w, r) / w
            for x in child:  # the slice statistics of the parent's replaced neurons
                axis = 1 if x == "down" else 0
                part = parent[x].index_select(axis, changed[x]).double()
                assert rec[x]["mean"] == pytest.approx(part.mean().item(), abs=1e-9)
                assert rec[x]["std"] == pytest.approx(part.std().item(), rel=1e-9)
        assert len({tuple(s.tolist()) for s in sets}) == E * m  # every child its own set


def test_noise_expansion_perturbs_r_of_each_child(moe_sources, tmp_path):
    src, m = moe_sources["qwen3_moe"], 2
    _run(src, tmp_path / "big", method="noise", ratio=0.25, noise_std=0.01, num_experts=E * m)
    old, new = load_tensors(src), load_tensors(tmp_path / "big")
    for e in range(E * m):
        child, parent = _experts(new, "qwen3_moe", 0, e), _experts(old, "qwen3_moe", 0, e // m)
        assert all(len(_changed_neurons(child[x], parent[x], x)) == num_reinit(48, 0.25) for x in child)
        assert all((child[x] - parent[x]).abs().max() < 0.1 for x in child)  # added, not replaced


# ------------------------------------------------------------------------------------------
# determinism


def test_expansion_does_not_depend_on_threads_or_shards(moe_sources, tmp_path):
    src = moe_sources["qwen2_moe"]
    kw = dict(method="drop", ratio=0.5, num_experts=8, seed=1)
    _run(src, tmp_path / "a", **kw, threads=1)
    _run(src, tmp_path / "b", **kw, threads=4, max_shard_size="40KB")
    assert len(json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    a, b = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _run(src, tmp_path / "c", **kw, threads=2)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------
# top-k, verify, inspect


def test_another_top_k_is_allowed_and_recorded(moe_sources, tmp_path):
    """top-(k2 m) computes SRC with top-k2 (here k2 = 1), not SRC's top-2: recorded as such, and
    --verify says why it is not exact."""
    src, out = moe_sources["mixtral"], tmp_path / "big"
    prov = _run(src, out, method="naive", num_experts=8, top_k=2, verify=True)
    assert prov["options"]["top_k"] == 2 and prov["expansion"]["top_k_preserves"] is False
    assert prov["verify"]["exact"] is False and "top-2 is not SRC's top-2 times" in prov["verify"]["not_exact_because"]
    assert prov["verify"]["max_abs_logit_diff"] > 1e-3
    from dropup.analysis.experts import format_report, inspect_checkpoint

    report = format_report(inspect_checkpoint(out, progress=False))
    assert "expanded     from 4 experts top-2: each into 2 children" in report
    assert "router rows copied from the parents" in report


def test_verify_accepts_an_exact_expansion(moe_sources, tmp_path):
    prov = _run(moe_sources["qwen2_moe"], tmp_path / "big", method="naive", num_experts=8, verify=True)
    assert prov["verify"]["exact"] and prov["verify"]["matches_dense"]


# ------------------------------------------------------------------------------------------
# the router-bias file


def test_router_bias_file_is_expanded_and_keeps_the_biased_routing(moe_sources, tmp_path):
    """A child's selection bias is its parent's / m: dropup's model, which adds the bias to the
    router probabilities for the top-k choice, computes the same logits from SRC and the expansion."""
    from dropup.hub.safetensors import ROUTER_BIAS_FILE, write_router_bias_file
    from dropup.model.io import load_model

    src = tmp_path / "src"
    shutil.copytree(moe_sources["qwen3_moe"], src)
    gen = torch.Generator().manual_seed(0)
    biases = {archs.router_bias_name("qwen3_moe", layer): 0.3 * torch.randn(E, generator=gen) for layer in (0, 1)}
    write_router_bias_file(src, biases)
    prov = _run(src, tmp_path / "big", method="naive", num_experts=8)
    assert prov["expansion"]["router_bias"] == ROUTER_BIAS_FILE
    card = (tmp_path / "big" / "README.md").read_text()
    assert "Expanded from the 4-expert MoE checkpoint `src`" in card and ROUTER_BIAS_FILE in card
    new = load_tensors(tmp_path / "big" / "dropup")
    for name, b in biases.items():
        assert torch.equal(new[name], (b / 2).repeat_interleave(2))
    tokens = torch.randint(0, 96, (2, 40), generator=gen)
    with torch.no_grad():
        a, b = load_model(src, dtype=torch.float32)(tokens), load_model(tmp_path / "big", dtype=torch.float32)(tokens)
        plain = load_model(moe_sources["qwen3_moe"], dtype=torch.float32)(tokens)  # no bias file
    assert (a - plain).abs().max() > 1e-3  # the biases change the routing
    assert (a - b).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("args,needles", [
    (["--num-experts", "6"], ["--num-experts 6", "multiple of 4", "--num-experts 8"]),
    (["--num-experts", "4"], ["--num-experts 4", "above it"]),
    (["--target", "qwen3_moe"], ["--target qwen3_moe cannot be built from a mixtral", "choose one of: mixtral"]),
    (["--method", "scratch"], ["--method scratch", "only drop, naive, noise do"]),
    (["--granularity", "2", "--top-k", "4"], ["--granularity", "leave --granularity out"]),
    (["--router-init", "normal"], ["--router-init", "router row is its parent's"]),
    (["--top-k", "9"], ["--top-k must be >= 1 and <= num_experts (8), got 9"]),
])
def test_bad_expansions_are_one_line(moe_sources, tmp_path, capsys, args, needles):
    out = tmp_path / "out"
    argv = ["upcycle", str(moe_sources["mixtral"]), str(out), "--quiet"]
    if "--num-experts" not in args:
        argv += ["--num-experts", "8"]
    cli_fails(capsys, argv + args, *needles)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_moe_type_without_moe_layers_is_refused(moe_sources, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(moe_sources["qwen3_moe-mixed"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [0, 1]}))
    cli_fails(capsys, ["upcycle", str(src), str(tmp_path / "out"), "--num-experts", "8", "--quiet"],
              "makes no layer MoE", "no experts to expand")
    assert not (tmp_path / "out").exists()


def test_a_router_bias_file_of_the_wrong_shape_is_refused_before_any_work(moe_sources, tmp_path, capsys):
    from dropup.hub.safetensors import write_router_bias_file

    src = tmp_path / "src"
    shutil.copytree(moe_sources["mixtral"], src)
    write_router_bias_file(src, {archs.router_bias_name("mixtral", layer): torch.zeros(E + 1) for layer in (0, 1)})
    cli_fails(capsys, ["upcycle", str(src), str(tmp_path / "out"), "--num-experts", "8", "--quiet"],
              "router_bias.safetensors does not match", "float32 [4]")
    assert not (tmp_path / "out").exists()
