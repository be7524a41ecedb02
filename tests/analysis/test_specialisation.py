"""dropup analyze routing: the metric functions, counts against transformers' own routers on
Hub-layout Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints, a naive upcycle's symmetry, run
saturation, the written outputs and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from dropup.analysis import specialisation as sp  # noqa: E402
from dropup.analysis.specialisation import RoutingOptions, analyze_routing  # noqa: E402
from dropup.data.tokens import write_dataset  # noqa: E402

from conftest import build_dense, cli_fails  # noqa: E402

torch.set_num_threads(1)
VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
MOE_CASES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    # a shared expert (not counted) and a dense layer in the middle (no router)
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                         num_hidden_layers=3, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                                         mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24, num_experts=5, num_experts_per_tok=2,
                                         norm_topk_prob=True, head_dim=16)),
}  # fmt: skip


def build_moe(path: Path, name: str, seed: int = 0) -> Path:
    """A tiny random MoE written by transformers' save_pretrained (the Hub layout)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    cls, kwargs = MOE_CASES[name]
    cfg = getattr(transformers, cls)(**{**TINY, **kwargs})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # routers at a larger scale: decisive top-k, no near-ties between implementations
            scale = 0.5 if pname.endswith((".gate.weight", "shared_expert_gate.weight")) else 0.1
            p.copy_((1 + 0.2 * torch.randn(p.shape, generator=gen)) if pname.endswith("norm.weight")
                    else scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return path


def dataset(path: Path, seed: int, n: int = 200, vocab: int = VOCAB, lo: int = 0, hi: int | None = None,
            domain: str | None = None, **meta) -> Path:
    rng = np.random.default_rng(seed)
    toks = rng.integers(lo, hi or vocab, n).tolist()
    return write_dataset(path, {"train": [toks[:10]], "val": [toks]}, vocab,
                         **({"domain": domain} if domain else {}), **meta)


@pytest.fixture(scope="module")
def moes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moes")
    return {name: build_moe(root / name, name) for name in MOE_CASES}


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("data")
    return [dataset(root / "a", 1, domain="code"), dataset(root / "b", 2, lo=40)]


# ---- pure functions ----------------------------------------------------------------------------

def test_jsd_zero_for_identical_and_ln2_for_disjoint_domains():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert sp.js_divergence(np.stack([p, p, p])) == pytest.approx(0, abs=1e-12)
    disjoint = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.25, 0.75]])
    assert sp.js_divergence(disjoint) == pytest.approx(math.log(2), abs=1e-12)
    # in between, and the generalised form: H(mean) - mean H
    q = np.array([[0.7, 0.3], [0.2, 0.8]])
    h = lambda x: -(x * np.log(x)).sum()  # noqa: E731
    assert sp.js_divergence(q) == pytest.approx(h(q.mean(0)) - (h(q[0]) + h(q[1])) / 2)


def test_balance_metrics_at_their_extremes():
    uniform, one = np.full(8, 1 / 8), np.eye(8)[3]
    assert sp.normalised_entropy(uniform) == pytest.approx(1)
    assert sp.normalised_entropy(one) == pytest.approx(0)
    assert sp.concentration(uniform, 2) == pytest.approx(0.25)
    assert sp.concentration(np.array([0.1, 0.6, 0.05, 0.25]), 2) == pytest.approx(0.85)
    assert sp.max_mean(uniform) == pytest.approx(1) and sp.max_mean(one) == pytest.approx(8)
    assert sp.jain_index(uniform) == pytest.approx(1) and sp.jain_index(one) == pytest.approx(1 / 8)
    shares = np.array([[0.5, 0.495, 0.005], [0.3, 0.695, 0.005]])
    assert sp.dead_experts(shares).tolist() == [False, False, True]
    assert sp.dead_experts(np.array([[0.5, 0.5, 0.0], [0.5, 0.45, 0.05]])).tolist() == [False, False, False]


def test_vocab_specialisation_and_repetition_baselines():
    table = np.array([[9, 1], [5, 5], [3, 0]])  # the last id is seen 3 times: not counted
    mean, ids = sp.vocab_specialisation(table, min_count=10)
    assert (mean, ids) == (pytest.approx(0.7), 2)
    assert sp.vocab_specialisation(table, min_count=100) == (None, 0)
    base = sp.repetition_baselines(np.full(4, 0.25), np.full(4, 0.25), k=2)
    assert base["rank1_same"] == pytest.approx(0.25) and base["prev_rank1_in_topk"] == pytest.approx(0.5)
    assert sp.default_layers(list(range(12))) == [0, 4, 7, 11]
    assert sp.default_layers([0, 2]) == [0, 2]


def test_counts_of_hand_made_routing():
    """One domain, one window of 4 tokens, E=3, k=2, ids chosen by hand."""
    c = sp.RoutingCounts(1, 1, 3, 2, vocab_size=5, vocab_layers=[0], device="cpu")
    tokens = torch.tensor([[4, 4, 1, 4]])
    ids = torch.tensor([[0, 1], [0, 2], [2, 0], [1, 2]])
    c.add(0, tokens, [ids])
    assert c.counts[0].tolist() == [[3, 2, 3]]
    assert c.rank1[0, 0].tolist() == [2, 1, 1]
    # pairs (0,1), (0,2), (2,0), (1,2): 0-1 once, 0-2 twice, 1-2 once
    assert c.coact[0].tolist() == [[0, 1, 2], [1, 0, 1], [2, 1, 0]]
    # (t-1, t) rank-1 pairs: 0->0 same; 0->2 (0 in t's top-k); 2->1 (2 in t's top-k)
    assert c.pairs.tolist() == [3] and c.same[0].tolist() == [1] and c.in_topk[0].tolist() == [3]
    assert c.vocab[0][4].tolist() == [2, 1, 0] and c.vocab[0][1].tolist() == [0, 0, 1]
    m = sp.summarise(c, [0], [0])
    assert m["repetition"]["rank1_same"] == [[1 / 3]]
    assert m["shares"][0][0] == pytest.approx([3 / 8, 2 / 8, 3 / 8])


# ---- counts equal transformers' own routing ----------------------------------------------------

def _hf_ids(path: Path, tokens: np.ndarray, seq_len: int) -> list[torch.Tensor]:
    """Per MoE layer, the top-k ids [N, k] of every token from transformers' router logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    k = model.config.num_experts_per_tok
    n_full = len(tokens) // seq_len
    windows = [tokens[: n_full * seq_len].reshape(n_full, seq_len), tokens[n_full * seq_len :][None]]
    per_window = []
    with torch.no_grad():
        for w in (w for w in windows if w.size):
            out = model(torch.as_tensor(w, dtype=torch.long), output_router_logits=True)
            per_window.append([r.float().softmax(-1).topk(k, -1).indices for r in out.router_logits])
    return [torch.cat(layer) for layer in zip(*per_window)]


def _hf_counts(path: Path, tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k counts [L, E] and pair counts [L, E, E] from transformers' router logits."""
    cfg = json.loads((path / "config.json").read_text())
    e = cfg.get("num_local_experts") or cfg["num_experts"]
    ids = _hf_ids(path, tokens, seq_len)
    counts = np.stack([np.bincount(i.reshape(-1).numpy(), minlength=e) for i in ids])
    hot = [np.eye(e)[i.numpy()].sum(1) for i in ids]
    return counts, np.stack([h.T @ h - np.diag(np.diag(h.T @ h)) for h in hot])


def _val_tokens(ds: Path, n: int) -> np.ndarray:
    return np.fromfile(ds / "val.bin", dtype=np.uint16)[:n].astype(np.int64)


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_counts_equal_transformers_router_logits(moes, domains, tmp_path, name):
    seq_len, n = 16, 150  # 9 full windows and a shorter last one
    res = analyze_routing(RoutingOptions([moes[name]], domains, str(tmp_path / "out"), tokens=n, seq_len=seq_len,
                                         batch_size=4, device="cpu"))
    m = res["models"][0]
    cfg = json.loads((moes[name] / "config.json").read_text())
    assert m["layers"] == ([0, 2] if name == "qwen2_moe" else [0, 1])  # the dense layer has no router
    counts, shares = np.asarray(m["counts"]), np.asarray(m["shares"])
    all_pairs = np.zeros_like(np.asarray(m["coactivation"]))
    for d, ds in enumerate(domains):
        hf, pairs = _hf_counts(moes[name], _val_tokens(ds, n), seq_len)
        np.testing.assert_array_equal(counts[:, d], hf)
        all_pairs += pairs.astype(np.int64)
    np.testing.assert_array_equal(np.asarray(m["coactivation"]), all_pairs)
    np.testing.assert_allclose(shares.sum(-1), 1.0, atol=1e-12)
    assert counts[:, 0].sum(-1).tolist() == [n * cfg["num_experts_per_tok"]] * len(m["layers"])
    assert res["domains"] == ["code", "b"]


def test_large_vocabularies_count_token_ids_in_the_figure_layers_only(moes, domains, tmp_path, monkeypatch):
    monkeypatch.setattr(sp, "VOCAB_BUDGET", VOCAB * 4 * 2 - 1)  # the mixtral's two layers do not fit
    m = analyze_routing(RoutingOptions([moes["mixtral"]], domains, str(tmp_path / "out"), tokens=100,
                                       device="cpu", layers=[1]))["models"][0]
    assert m["vocab"]["layers"] == [1] and len(m["vocab"]["mean_top_share"]) == 1
    monkeypatch.setattr(sp, "VOCAB_BUDGET", VOCAB * 4 * 2)
    m = analyze_routing(RoutingOptions([moes["mixtral"]], domains, str(tmp_path / "out2"), tokens=100,
                                       device="cpu", layers=[1]))["models"][0]
    assert m["vocab"]["layers"] == [0, 1]


# ---- a naive upcycle: identical experts ---------------------------------------------------------

@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return build_dense(tmp_path_factory.mktemp("dense") / "llama", "llama", vocab=VOCAB)


def test_naive_upcycle_with_zero_routers_sends_every_token_to_the_same_experts(dense, domains, tmp_path):
    """Zero routers: every logit is 0, every token's softmax is uniform and the top-k is the same
    tie-break for every token, in every layer and domain: k experts take everything, the other
    E - k are dead, the domains are indistinguishable (JSD 0), one pair co-activates."""
    from dropup.convert.upcycle import upcycle

    moe = tmp_path / "naive"
    upcycle(dense, moe, method="naive", num_experts=4, top_k=2, router_init="zeros", progress=False)
    few_ids = dataset(tmp_path / "few-ids", 7, hi=6)  # every id is seen >= 10 times
    m = analyze_routing(RoutingOptions([moe], [*domains, few_ids], str(tmp_path / "out"), tokens=100,
                                       seq_len=20, device="cpu"))["models"][0]
    shares = np.asarray(m["shares"])
    assert np.allclose(shares, shares[0, 0])  # the same distribution everywhere
    assert sorted(shares[0, 0].tolist()) == [0, 0, 0.5, 0.5]
    assert m["vocab"]["ids"] == [6, 6]
    assert m["jsd"] == [0.0, 0.0] and m["dead_count"] == [2, 2]
    assert np.allclose(m["concentration"], 1.0)
    co = np.asarray(m["coactivation"])
    assert (co > 0).sum() == 2 * 2  # one pair (both orders) per layer
    assert np.allclose(m["repetition"]["rank1_same"], 1.0)
    assert np.allclose(m["vocab"]["mean_top_share"], 1.0)


def test_naive_upcycle_routing_depends_only_on_router_rows(dense, domains, tmp_path):
    """With identical experts the model's function does not depend on which expert is which, so
    swapping two experts' router rows swaps exactly their counts and nothing else."""
    from dropup.convert.upcycle import upcycle
    from dropup.model.io import load_model, save_model

    moe = tmp_path / "naive"
    upcycle(dense, moe, method="naive", num_experts=4, top_k=2, router_init="normal", router_std=0.5,
            progress=False)
    model = load_model(moe)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight[[0, 3]] = layer.mlp.router.weight[[3, 0]].clone()
    swapped = tmp_path / "swapped"
    shutil.copytree(moe, swapped)
    save_model(model, swapped)
    res = analyze_routing(RoutingOptions([moe, swapped], domains, str(tmp_path / "out"), tokens=120,
                                         seq_len=20, device="cpu"))
    a, b = (np.asarray(m["counts"]) for m in res["models"])
    np.testing.assert_array_equal(a[..., [3, 1, 2, 0]], b)
    assert res["models"][0]["mean_jsd"] == pytest.approx(res["models"][1]["mean_jsd"], abs=1e-12)


def test_an_upcycle_with_dense_layers_reports_only_its_moe_layers(domains, tmp_path):
    """--moe-layers every:2 on a 4-layer model: routing.json names layers 1 and 3 (their true
    indices) and their counts are transformers' own, layer by layer."""
    from dropup.convert.upcycle import upcycle
    from dropup.errors import UserError

    src = build_dense(tmp_path / "dense", "qwen3", vocab=VOCAB, layers=4)
    moe = tmp_path / "moe"
    upcycle(src, moe, method="drop", ratio=0.5, num_experts=4, top_k=2, moe_layers="every:2",
            router_init="normal", router_std=0.5, progress=False)
    res = analyze_routing(RoutingOptions([moe], domains, str(tmp_path / "out"), tokens=100, seq_len=20,
                                         device="cpu"))
    m = res["models"][0]
    assert m["layers"] == [1, 3] and len(m["counts"]) == len(m["jsd"]) == 2
    for d, ds in enumerate(domains):
        np.testing.assert_array_equal(np.asarray(m["counts"])[:, d], _hf_counts(moe, _val_tokens(ds, 100), 20)[0])
    with pytest.raises(UserError, match="--layers 2 is not an MoE layer"):
        analyze_routing(RoutingOptions([moe], domains, str(tmp_path / "out2"), tokens=100, device="cpu", layers=[2]))


# ---- outputs, a run directory, the CLI ---------------------------------------------------------

def _fake_run(root: Path, steps: dict[int, Path]) -> Path:
    for step, src in steps.items():
        shutil.copytree(src, root / "ckpt" / f"step_{step}" / "model")
    return root


def test_run_directory_saturation_and_outputs(moes, domains, tmp_path, capsys):
    from dropup.cli import main

    other = build_moe(tmp_path / "other", "mixtral", seed=5)  # same shape, other routers
    run = _fake_run(tmp_path / "run", {10: other, 20: moes["mixtral"], 30: moes["mixtral"]})
    out = tmp_path / "out"
    assert main(["analyze", "routing", str(run), str(moes["qwen3_moe"]), "--data", *map(str, domains),
                 "--out", str(out), "--tokens", "100", "--seq-len", "25", "--device", "cpu", "--layers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "mean JSD" in printed and "run/step_30" in printed
    assert sorted(p.name for p in out.iterdir()) == ["coactivation.png", "jsd.png", "report.md", "routing.json",
                                                     "saturation.png", "shares.png"]
    res = json.loads((out / "routing.json").read_text())
    assert [m["name"] for m in res["models"]] == ["run/step_10", "run/step_20", "run/step_30", "qwen3_moe"]
    (sat,) = res["saturation"]
    assert sat["steps"] == [10, 20, 30] and sat["final_step"] == 30
    assert sat["mean_overlap"][1:] == [1.0, 1.0]  # the same weights as the final checkpoint
    assert 0 <= sat["mean_overlap"][0] < 1
    # the overlap of the first checkpoint, from transformers' routing of both models
    a, b = ([_hf_ids(p, _val_tokens(ds, 100), 25) for ds in domains] for p in (other, moes["mixtral"]))
    inter = [sum((x[:, :, None] == y[:, None, :]).any(-1).sum().item() for x, y in zip(la, lb))
             for la, lb in zip(zip(*a), zip(*b))]
    np.testing.assert_allclose(sat["overlap"][0], np.array(inter) / (2 * 100 * 2), atol=1e-12)
    assert res["figure_layers"]["qwen3_moe"] == [1]
    # the final checkpoint's counts are those of the same model analysed on its own
    assert res["models"][2]["counts"] == res["models"][1]["counts"]
    assert "| run/step_10 |" in (out / "report.md").read_text()


# ---- bad input: one line, exit 2, OUT not written ----------------------------------------------

def _fails(capsys, tmp_path, argv, *needles):
    out = tmp_path / "bad-out"
    argv = [*map(str, argv), *([] if "--tokens" in argv else ["--tokens", "50"])]
    cli_fails(capsys, ["analyze", "routing", *argv, "--out", str(out), "--device", "cpu"], *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad-out")]


def _tokenizer(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path.mkdir(parents=True, exist_ok=True)
    Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])).save(str(path / "tokenizer.json"))
    return path


def test_bad_inputs(moes, domains, dense, tmp_path, capsys):
    mix = moes["mixtral"]
    _fails(capsys, tmp_path, [dense, "--data", domains[0]], "dense model", "dropup eval")
    big = dataset(tmp_path / "big", 3, vocab=200, lo=150)
    _fails(capsys, tmp_path, [mix, "--data", big], "token id", "vocabulary has 96")
    _fails(capsys, tmp_path, [mix, "--data", domains[0], "--tokens", "1000"], "fewer than --tokens 1000")
    (tmp_path / "empty-run").mkdir()
    _fails(capsys, tmp_path, [tmp_path / "empty-run", "--data", domains[0]], "no ckpt/step_N/model")
    _fails(capsys, tmp_path, [mix, "--data", domains[0], domains[0]], "both domain")
    _fails(capsys, tmp_path, [mix, "--data", domains[0], "--layers", "7"], "--layers 7")
    _fails(capsys, tmp_path, [mix, "--data", domains[0], "--tokens", "0"], "--tokens")
    # a dataset prepared with another tokenizer than the model's
    model = tmp_path / "with-tok"
    shutil.copytree(mix, model)
    _tokenizer(model, [f"w{i}" for i in range(VOCAB)])
    other = dataset(tmp_path / "other-tok", 4, tokenizer={"path": "tok"})
    _tokenizer(other / "tok", [f"x{i}" for i in range(VOCAB)])
    _fails(capsys, tmp_path, [model, "--data", other, "--tokens", "50"], "--allow-tokenizer-mismatch")
    res = analyze_routing(RoutingOptions([model], [other], str(tmp_path / "ok"), tokens=50, device="cpu",
                                         allow_tokenizer_mismatch=True))
    assert res["models"][0]["counts"]
    # the same tokenizer is accepted without the flag
    same = dataset(tmp_path / "same-tok", 4, tokenizer={"path": "tok"})
    _tokenizer(same / "tok", [f"w{i}" for i in range(VOCAB)])
    analyze_routing(RoutingOptions([model], [same], str(tmp_path / "ok2"), tokens=50, device="cpu"))
    # a non-empty OUT is refused
    cli_fails(capsys, ["analyze", "routing", str(mix), "--data", str(domains[0]), "--out", str(tmp_path / "ok"),
                       "--tokens", "50", "--device", "cpu"], "not empty", "--overwrite")


def test_analyze_usage_errors_are_one_line(capsys):
    from dropup.cli import main

    for argv, needles in [(["analyze"], ("dropup analyze: error:", "{routing,experts}", "(see dropup analyze --help)")),
                          (["analyze", "routing", "x"], ("required: --data, --out",
                                                         "(see dropup analyze routing --help)")),
                          (["analyze", "routing", "x", "--data", "d", "--out", "o", "--bogus"],
                           ("unrecognized arguments: --bogus", "(see dropup analyze routing --help)"))]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, err
        assert all(n in err[0] for n in needles), err[0]


def test_a_run_export_is_named_like_the_run_names_it(moes, tmp_path):
    from dropup.analysis.specialisation import resolve_checkpoints

    run = _fake_run(tmp_path / "myrun", {7: moes["mixtral"]})
    found = resolve_checkpoints([str(run / "ckpt" / "step_7" / "model"), str(moes["qwen3_moe"])])
    assert [m.name for m in found] == ["myrun/step_7", "qwen3_moe"]
