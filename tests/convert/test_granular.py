"""Fine-grained upcycling (--granularity) and Qwen2-MoE's shared-expert starts (--shared-expert),
checked against transformers' own modelling code."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_dense, cli_fails, load_tensors

from dropup.hub import names as archs
from test_upcycle import _changed_neurons, _expert, _ffn, _hf, _logits, _run


def _shard(t: torch.Tensor, matrix: str, s: int, G: int) -> torch.Tensor:
    w = t.shape[1 if matrix == "down" else 0] // G
    return t[:, s * w:(s + 1) * w] if matrix == "down" else t[s * w:(s + 1) * w]


# (source arch, target, G, E, k): several G and k per target that can state the expert width
EXACT = [
    ("llama", "mixtral", 2, 4, 2),
    ("llama", "mixtral", 4, 8, 4),
    ("mistral", "mixtral", 8, 16, 8),
    ("qwen3", "qwen3_moe", 2, 8, 4),
    ("qwen3", "qwen3_moe", 4, 12, 4),
    ("qwen2", "qwen2_moe", 2, 6, 2),
    ("qwen2", "qwen2_moe", 8, 16, 16),
]


@pytest.mark.parametrize("arch,target,G,E,k", EXACT)
def test_naive_granular_upcycling_gives_dense_logits(dense_models, tmp_path, arch, target, G, E, k):
    src = dense_models[arch]
    prov = _run(src, tmp_path / "moe", method="naive", target=target, granularity=G, num_experts=E, top_k=k)
    moe = _hf(tmp_path / "moe")
    width = moe.config.intermediate_size if target == "mixtral" else moe.config.moe_intermediate_size
    assert width == 64 // G and prov["options"]["granularity"] == G
    diff = (_logits(moe) - _logits(_hf(src))).abs().max().item()
    assert diff <= 1e-5, diff


def test_granular_experts_are_scaled_shards_of_the_dense_ffn(dense_models, tmp_path):
    G, E = 4, 8
    _run(dense_models["llama"], tmp_path / "moe", method="naive", granularity=G, num_experts=E, top_k=4)
    dense, moe = _ffn(load_tensors(dense_models["llama"]), 1), load_tensors(tmp_path / "moe")
    for e in range(E):
        x = _expert(moe, "mixtral", 1, e)
        for m in ("gate", "up", "down"):
            want = _shard(dense[m], m, e % G, G) * (G if m == "down" else 1)
            assert torch.equal(x[m], want), (e, m)


@pytest.mark.parametrize("init", ["uniform", "normal"])
def test_virtual_group_router_logits_are_equal_within_a_group(wide_llama, tmp_path, init):
    G, E, k = 4, 16, 8
    _run(wide_llama, tmp_path / "moe", method="drop", granularity=G, num_experts=E, top_k=k, router_init=init)
    w = load_tensors(tmp_path / "moe")[archs.router_name("mixtral", 0)]
    x = torch.randn(50, w.shape[1], generator=torch.Generator().manual_seed(0))
    logits = (x @ w.T).view(50, E // G, G)
    assert torch.equal(logits, logits[..., :1].expand_as(logits))  # identical within each group
    group = logits[..., 0]
    assert (group.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct across groups: no ties
    # so top-(kG) selects whole groups
    chosen = torch.topk(x @ w.T, k, dim=1).indices // G
    assert all(sorted(c.bincount(minlength=E // G).tolist()) == [0] * (E // G - k // G) + [G] * (k // G)
               for c in chosen)


@pytest.mark.parametrize("method", ["drop", "noise"])
def test_ratio_acts_on_each_fine_grained_experts_own_neurons(wide_llama, tmp_path, method):
    G, E, r = 4, 8, 0.5  # d_f 320: 80 neurons per expert, 40 re-drawn in each
    prov = _run(wide_llama, tmp_path / "moe", method=method, ratio=r, granularity=G, num_experts=E, top_k=4)
    dense, moe = _ffn(load_tensors(wide_llama), 0), load_tensors(tmp_path / "moe")
    sets = []
    for e in range(E):
        x = _expert(moe, "mixtral", 0, e)
        changed = {m: _changed_neurons(x[m], _shard(dense[m], m, e % G, G) * (G if m == "down" else 1), m)
                   for m in ("gate", "up", "down")}
        assert all(len(c) == 40 for c in changed.values()), (e, {m: len(c) for m, c in changed.items()})
        assert torch.equal(changed["gate"], changed["up"]) and torch.equal(changed["gate"], changed["down"])
        sets.append(changed["gate"])
        rec = prov["layers"][0][e]
        assert rec["intact_fraction"] == 0.5 and rec["up"]["reinit_fraction"] == 0.5
    assert len({tuple(s.tolist()) for s in sets}) == E  # each expert its own draw
    if method == "drop":  # slice statistics of the expert's own (scaled) shard
        e, m = 1, "down"
        old = _shard(dense[m], m, e % G, G) * G
        idx = sets[e]
        rec = prov["layers"][0][e][m]
        assert rec["std"] == pytest.approx(old[:, idx].double().std().item(), rel=1e-9)


def test_granular_outputs_are_deterministic_across_threads_and_shards(wide_llama, tmp_path):
    kw = dict(method="drop", granularity=2, num_experts=4, top_k=2, seed=5)
    _run(wide_llama, tmp_path / "a", **kw)
    _run(wide_llama, tmp_path / "b", threads=1, **kw)
    _run(wide_llama, tmp_path / "c", threads=3, max_shard_size="100KB", **kw)
    a, b, c = (load_tensors(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_granularity_recorded_only_when_set_and_shown_by_inspect(dense_models, tmp_path, capsys):
    from dropup.cli import main

    plain = _run(dense_models["llama"], tmp_path / "plain", method="naive")
    assert "granularity" not in plain["options"]  # the record of a whole-width conversion is unchanged
    _run(dense_models["llama"], tmp_path / "fine", method="drop", granularity=4, num_experts=8, top_k=4)
    rec = json.loads((tmp_path / "fine" / "upcycling.json").read_text())
    assert rec["options"]["granularity"] == 4
    assert main(["inspect", str(tmp_path / "fine")]) == 0
    out = capsys.readouterr().out
    assert "expert d_f 16" in out and "granularity  4" in out
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("0 ", "1 "))]
    assert len(lines) == 2  # the similarity pass ran on experts narrower than d_f


@pytest.mark.parametrize("argv,needles", [
    (["--granularity", "3", "--num-experts", "6", "--top-k", "3"], ["--granularity 3", "divide", "64"]),
    (["--granularity", "4", "--num-experts", "6", "--top-k", "4"], ["--num-experts 6", "multiple of 4"]),
    (["--granularity", "4", "--num-experts", "8", "--top-k", "2"], ["--top-k 2", "multiple of 4"]),
    (["--granularity", "2", "--num-experts", "8", "--router-init", "zeros"], ["zeros", "virtual group"]),
    (["--granularity", "0"], ["--granularity must be >= 1"]),
    (["--shared-expert", "dense"], ["mixtral has no shared expert"]),
    (["--shared-expert-size", "32"], ["mixtral has no shared expert"]),
])
def test_bad_granular_input_is_one_line_and_writes_nothing(dense_models, tmp_path, capsys, argv, needles):
    out = tmp_path / "out"
    cli_fails(capsys, ["upcycle", str(dense_models["llama"]), str(out), "--quiet", *argv], *needles)
    assert not out.exists()


# ---- Qwen2-MoE's shared expert --------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(method="naive", shared_expert="dense"),
    dict(method="drop", ratio=0.5, shared_expert="dense"),  # routed experts silent: exact whatever r
    dict(method="naive", shared_expert="dense", granularity=4, num_experts=8, top_k=4),
    dict(method="naive", shared_expert="shard", granularity=2, num_experts=4, top_k=2),
    dict(method="naive", shared_expert="shard", granularity=4, num_experts=6, top_k=3),
    dict(method="naive", shared_expert="silent", shared_expert_size=16),
])
def test_shared_expert_starts_that_keep_the_dense_function(dense_models, tmp_path, kw):
    src = dense_models["qwen2"]
    _run(src, tmp_path / "moe", **kw)
    moe = _hf(tmp_path / "moe")
    G = kw.get("granularity", 1)
    want = kw.get("shared_expert_size") or (64 // G if kw["shared_expert"] == "shard" else 64)
    assert moe.config.shared_expert_intermediate_size == want
    assert moe.config.moe_intermediate_size == 64 // G
    diff = (_logits(moe) - _logits(_hf(src))).abs().max().item()
    assert diff <= 1e-5, diff


def test_shared_expert_dense_start_layout(dense_models, tmp_path):
    _run(dense_models["qwen2"], tmp_path / "moe", method="drop", shared_expert="dense", num_experts=4)
    dense, moe = _ffn(load_tensors(dense_models["qwen2"]), 0), load_tensors(tmp_path / "moe")
    shared = archs.shared_expert_names("qwen2_moe", 0)
    assert torch.equal(moe[shared["gate"]], dense["gate"]) and torch.equal(moe[shared["down"]], 2 * dense["down"])
    assert not moe[shared["shared_gate"]].any()  # sigmoid(0) = 1/2, undone by the doubled down
    for e in range(4):
        x = _expert(moe, "qwen2_moe", 0, e)
        assert not x["down"].any() and not torch.equal(x["up"], dense["up"])  # silent, yet drawn anew


@pytest.mark.parametrize("argv,needles", [
    (["--shared-expert", "shard"], ["needs --granularity G >= 2"]),
    (["--shared-expert", "shard", "--granularity", "2", "--shared-expert-size", "64"],
     ["--shared-expert-size 64", "32 neurons"]),
    (["--shared-expert", "dense", "--shared-expert-size", "32"], ["--shared-expert-size 32", "64 neurons"]),
    (["--shared-expert-size", "65"], ["at most d_f = 64"]),
    (["--shared-expert", "dense", "--method", "scratch"], ["inherits nothing"]),
    (["--shared-expert", "shard", "--granularity", "4", "--num-experts", "8"], ["multiple of 3"]),
])
def test_bad_shared_expert_input_is_one_line_and_writes_nothing(dense_models, tmp_path, capsys, argv, needles):
    out = tmp_path / "out"
    cli_fails(capsys, ["upcycle", str(dense_models["qwen2"]), str(out), "--quiet", *argv], *needles)
    assert not out.exists()


# ---- dropup's own model and trainer on a granular checkpoint --------------------------------


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(granularity=4, num_experts=8, top_k=4)),
    ("qwen2", dict(granularity=2, num_experts=4, top_k=2, shared_expert="shard")),
])
def test_dropup_model_matches_transformers_on_a_granular_checkpoint(dense_models, tmp_path, arch, kw):
    from dropup.model.io import load_model

    _run(dense_models[arch], tmp_path / "moe", method="drop", ratio=0.5, **kw)
    hf, ours = _hf(tmp_path / "moe"), load_model(tmp_path / "moe")
    assert ours.config.moe_intermediate_size == 64 // kw["granularity"]
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_trainer_trains_a_granular_checkpoint(tmp_path):
    import yaml

    from dropup.data.tokens import write_dataset
    from dropup.train.config import load_config
    from dropup.train.loop import train

    dense = build_dense(tmp_path / "dense", "llama", vocab=64)
    _run(dense, tmp_path / "moe", method="drop", granularity=2, num_experts=4, top_k=2)
    g = torch.Generator().manual_seed(0)
    docs = [[int(t) for t in torch.randint(1, 64, (50,), generator=g)] + [0] for _ in range(40)]
    data = write_dataset(tmp_path / "data", {"train": docs, "val": docs[:4]}, 64, eos_token_id=0)
    cfg = {"model": {"init": str(tmp_path / "moe")}, "data": {"datasets": [{"path": str(data)}], "seq_len": 16,
           "eval_batches": 1}, "batch": {"global_batch": 4, "micro_batch": 2}, "steps": 2,
           "optim": {"lr": 1e-3, "warmup_steps": 1}, "log_interval": 1, "eval_interval": 2, "save_interval": 2,
           "progress": False, "out_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = train(load_config(tmp_path / "c.yaml"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "lm_loss" in m]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(m["lm_loss"])) for m in steps)
    exported = sorted(run.rglob("config.json"))
    assert exported and all(json.loads(p.read_text())["intermediate_size"] == 32 for p in exported)  # expert width


@pytest.mark.parametrize("kw", [dict(method="drop", ratio=0.5, shared_expert="dense"),
                                dict(method="naive", granularity=4, num_experts=8, top_k=4)])
def test_verify_expects_the_dense_function_of_exact_starts(dense_models, tmp_path, kw):
    r = _run(dense_models["qwen2"], tmp_path / "moe", verify=True, **kw)["verify"]
    assert r["exact"] and r["matches_dense"] and r["max_abs_logit_diff"] < 1e-4
