"""dropup analyze experts: weight similarity, neurons kept from the dense source, output CKA,
the redundancy test, run directories, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import build_dense, cli_fails

from dropup import upcycle
from dropup.analysis.diversity import ExpertsOptions, analyze_experts, linear_cka, set_skip_top_ranks
from dropup.cli import main
from dropup.data.tokens import write_dataset
from dropup.model.io import load_model

VOCAB = 96


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("div")
    dense = build_dense(root / "dense", "llama", hidden=32, d_f=128, layers=2, vocab=VOCAB)
    out = {"dense": dense}
    for name, kw in {"naive": dict(method="naive"), "drop": dict(method="drop", ratio=0.5),
                     "per_matrix": dict(method="drop", ratio=0.5, index_sampling="per-matrix"),
                     "scratch": dict(method="drop", ratio=1.0)}.items():
        out[name] = root / name
        upcycle(dense, out[name], num_experts=4, top_k=1, progress=False, **kw)
    rng = np.random.default_rng(0)
    for domain in ("code", "prose"):
        docs = [rng.integers(0, VOCAB, 200).tolist() for _ in range(4)]
        out[domain] = write_dataset(root / domain, {"train": docs, "val": docs}, VOCAB)
    return out


def _opts(**kw):
    return ExpertsOptions(progress=False, tokens=256, seq_len=32, **kw)


def test_identical_to_dense_follows_the_method(models, tmp_path):
    got = {}
    for name in ("naive", "drop", "per_matrix"):
        r = analyze_experts([models[name]], tmp_path / name, _opts(dense=str(models["dense"])))
        got[name] = r["checkpoints"][0]["summary"]["mean_identical_to_dense"]
        layer = r["checkpoints"][0]["layers"][0]
        assert len(layer["cosine"]) == 4 and len(layer["identical_to_dense"]) == 4
    assert got["naive"] == 1.0
    assert got["drop"] == pytest.approx(0.5, abs=0.02)  # 64 of 128 neurons kept per expert
    assert got["per_matrix"] == pytest.approx(0.125, abs=0.06)  # (1 - r)^3
    out = tmp_path / "naive"
    assert {p.name for p in out.iterdir()} == {"experts.json", "report.md", "similarity_naive.png"}
    assert "| naive | 1.0000 | 1.0000 | 1.0000 | - |" in (out / "report.md").read_text()


@pytest.mark.parametrize("arch, spec, layers", [("qwen3", "every:2", [1, 3]), ("granite", None, [0, 1, 2, 3])])
def test_mixed_layers_and_stacked_experts(tmp_path, arch, spec, layers):
    """A model with dense layers (--moe-layers) lists only its MoE layers, under their indices;
    GraniteMoE's stacked experts are read like per-expert ones. drop r = 0.5: half of each
    expert's neurons still equal the dense FFN's."""
    dense = build_dense(tmp_path / "dense", arch, d_f=128, layers=4, vocab=VOCAB)
    moe = tmp_path / "moe"
    upcycle(dense, moe, method="drop", ratio=0.5, num_experts=4, top_k=1, moe_layers=spec, progress=False)
    r = analyze_experts([moe], tmp_path / "out", _opts(dense=str(dense)))["checkpoints"][0]
    assert [x["layer"] for x in r["layers"]] == layers
    assert r["summary"]["mean_identical_to_dense"] == pytest.approx(0.5, abs=0.02)


def test_skip_zero_leaves_logits_unchanged(models):
    model = load_model(models["drop"], dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        set_skip_top_ranks(model, 1)
        skipped = model(ids)
        set_skip_top_ranks(model, 0)
        after = model(ids)
    assert torch.equal(before, after)
    assert not torch.allclose(before, skipped)
    assert all("skip_top_ranks" not in m.__dict__ for m in model.modules())


def test_redundancy_zero_for_identical_experts(models, tmp_path):
    data = [str(models["code"]), str(models["prose"])]
    naive = analyze_experts([models["naive"]], tmp_path / "n", _opts(data=data))["checkpoints"][0]
    scratch = analyze_experts([models["scratch"]], tmp_path / "s", _opts(data=data))["checkpoints"][0]
    assert set(naive["redundancy"]) == {"code", "prose"}
    for domain in ("code", "prose"):
        assert abs(naive["redundancy"][domain]["skip_1"]) < 1e-5
        assert abs(scratch["redundancy"][domain]["skip_1"]) > 1e-3
    assert naive["summary"]["mean_output_cka"] == pytest.approx(1.0)
    assert scratch["summary"]["mean_output_cka"] < 0.9
    # top-1 of 4 experts: ranks 1-2 can be skipped too
    assert naive["redundancy"]["code"]["skip_2"] == pytest.approx(0.0, abs=1e-5)


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(200, 8, generator=g)) < 0.2


def test_run_directory_gives_curves(models, tmp_path):
    run = tmp_path / "run"
    for step, src in ((10, "naive"), (20, "drop")):
        shutil.copytree(models[src], run / "ckpt" / f"step_{step}" / "model")
    assert main(["analyze", "experts", str(run), "--out", str(tmp_path / "out"), "--quiet", "--data",
                 str(models["code"]), "--tokens", "64", "--seq-len", "32"]) == 0
    r = json.loads((tmp_path / "out" / "experts.json").read_text())
    assert [c["step"] for c in r["checkpoints"]] == [10, 20]
    assert r["curves"]["step"] == [10, 20]
    assert r["curves"]["mean_identical_neurons"][0] == 1.0 > r["curves"]["mean_identical_neurons"][1]
    assert r["curves"]["code skip_1"][0] == pytest.approx(0.0, abs=1e-5)  # naive: identical experts
    assert (tmp_path / "out" / "curves.png").is_file()
    assert "| run/step_20 | code |" in (tmp_path / "out" / "report.md").read_text()


def test_bad_input_one_line_nothing_written(models, tmp_path, capsys):
    out = tmp_path / "out"
    cli_fails(capsys, ["analyze", "experts", str(models["dense"]), "--out", str(out)],
              "not an MoE", "dropup inspect")
    other = build_dense(tmp_path / "other", "llama", hidden=32, d_f=64, layers=2, vocab=VOCAB)
    cli_fails(capsys, ["analyze", "experts", str(models["naive"]), "--dense", str(other), "--out", str(out)],
              "--dense", "upcycled from")
    (tmp_path / "empty" / "ckpt").mkdir(parents=True)
    cli_fails(capsys, ["analyze", "experts", str(tmp_path / "empty"), "--out", str(out)], "no ckpt/step_N/model")
    big = write_dataset(tmp_path / "big", {"val": [[VOCAB + 5, 1, 2, 3]]}, VOCAB + 10)
    cli_fails(capsys, ["analyze", "experts", str(models["naive"]), "--data", str(big), "--out", str(out)],
              "tokenizer")
    assert not out.exists()


@pytest.mark.parametrize("norm", [True, False])
def test_skip_routes_to_the_next_ranks_weighted_as_the_architecture(norm):
    from dropup.hub.config import ModelConfig
    from dropup.model.decoder import MoE

    cfg = ModelConfig(
        model_type="qwen2_moe", vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=8, norm_topk_prob=norm)  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(20, 16)
    probs = torch.nn.functional.linear(x, moe.router.weight).softmax(-1)
    top, ids = probs.topk(4, dim=-1)
    moe.skip_top_ranks = 2
    _, w, got = moe.route(x)
    assert torch.equal(got, ids[:, 2:])
    want = top[:, 2:] / top[:, 2:].sum(-1, keepdim=True) if norm else top[:, 2:]
    assert torch.allclose(w, want)
