"""`dropup inspect` on damaged checkpoints: one line and exit 2, never a traceback; a damaged
upcycling.json does not stop the report, which says the provenance is unreadable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dropup import upcycle
from dropup.analysis.experts import inspect_checkpoint
from dropup.cli import main


@pytest.fixture(scope="module")
def moe_model(dense_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "moe"
    upcycle(dense_models["llama"], out, num_experts=4, top_k=2, ratio=0.5, progress=False)
    return out


@pytest.fixture
def moe(moe_model, tmp_path) -> Path:
    dst = tmp_path / "moe"
    shutil.copytree(moe_model, dst)
    return dst


def _fails(capsys, path: Path, *needles) -> str:
    code = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _edit_tensors(path: Path, fn) -> None:
    t = load_file(path / "model.safetensors")
    fn(t)
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})


def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    d = fn(d)
    path.write_text(json.dumps(d))


def _expert(layer: int, e: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"


# ---- provenance: reported as unreadable, the checkpoint still described ---------------------------


def _drop(keys: str):
    def fn(d):
        *path, last = keys.split(".")
        node = d
        for k in path:
            node = node[k]
        del node[last]
        return d
    return fn


def _set(keys: str, value):
    def fn(d):
        *path, last = keys.split(".")
        node = d
        for k in path:
            node = node[k]
        node[last] = value
        return d
    return fn


@pytest.mark.parametrize("damage,reason", [
    (lambda p: p.write_text('{"options": {"method": "dr'), "not valid JSON"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    (lambda p: p.write_text("[1, 2, 3]"), "a JSON array, not an object"),
    (lambda p: p.write_text('"drop"'), "a JSON string, not an object"),
    (lambda p: _edit_json(p, _drop("options")), "it has no 'options.method'"),
    (lambda p: _edit_json(p, _drop("options.seed")), "it has no 'options.seed'"),
    (lambda p: _edit_json(p, _drop("source")), "it has no 'source.path'"),
    (lambda p: _edit_json(p, _set("options.ratio", "half")), "its 'options.ratio' is \"half\", of the wrong type"),
    (lambda p: _edit_json(p, _set("options", [1])), "it has no 'options.method'"),
    (lambda p: _edit_json(p, _set("layers", [])), "holds no experts"),
    (lambda p: _edit_json(p, _set("layers", [[{"intact_fraction": "all"}]])), "not a number"),
    (lambda p: _edit_json(p, _set("layers", {"0": 1})), "its 'layers' is"),
])
def test_unreadable_provenance_is_reported_not_fatal(moe, capsys, damage, reason):
    damage(moe / "upcycling.json")
    r = inspect_checkpoint(moe, similarity=False)
    assert "upcycling" not in r and reason in r["upcycling_unreadable"], r.get("upcycling_unreadable")
    assert r["num_experts"] == 4 and r["architecture"] == "mixtral"
    assert main(["inspect", str(moe), "--no-similarity"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint   " in out and "4 routed, top-2" in out
    assert "provenance   upcycling.json is unreadable (" in out and reason in out
    assert "how this checkpoint was built is unknown" in out
    assert main(["inspect", str(moe), "--json"]) == 0
    assert reason in json.loads(capsys.readouterr().out)["upcycling_unreadable"]


def test_intact_provenance_is_unchanged(moe):
    u = inspect_checkpoint(moe, similarity=False)["upcycling"]
    assert u["method"] == "drop" and u["ratio"] == 0.5 and u["seed"] == 0
    assert u["source_type"] == "llama" and u["intact_fraction_mean"] == 0.5


# ---- the checkpoint itself: one line ---------------------------------------------------------------


def test_dense_checkpoint(dense_models, capsys):
    _fails(capsys, dense_models["llama"], "model_type 'llama' is not an MoE dropup knows")


def test_config_json_is_a_list(moe, capsys):
    (moe / "config.json").write_text("[]")
    _fails(capsys, moe, "config.json: a JSON array, not an object")


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_safetensors(moe, capsys, keep):
    f = moe / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    _fails(capsys, moe, str(f), "not a valid safetensors file")


def test_missing_expert_tensor(moe, capsys):
    _edit_tensors(moe, lambda t: t.pop(_expert(1, 3, "w2")))
    _fails(capsys, moe, "does not store per-expert tensors for layer 1")


@pytest.mark.parametrize("name,value,needle", [
    (_expert(0, 2, "w1"), torch.zeros(8, 32), "has shape [8, 32], but expert 0 of layer 0 has a gate of shape [64, 32]"),
    (_expert(1, 0, "w1"), torch.zeros(64 * 32), "has shape [2048]"),
    (_expert(0, 1, "w2"), torch.zeros(64, 32), "has shape [64, 32]"),
    (_expert(1, 2, "w3"), torch.zeros(64, 32, dtype=torch.int32), "is int32, not a floating-point weight"),
    (_expert(0, 0, "w1"), torch.zeros(64, 32, dtype=torch.int8), "not a floating-point weight"),
])
def test_malformed_expert_tensor(moe, capsys, name, value, needle):
    _edit_tensors(moe, lambda t: t.__setitem__(name, value))
    _fails(capsys, moe, needle, "the checkpoint is malformed")
    assert main(["inspect", str(moe), "--no-similarity"]) == 0  # counting parameters still works
    capsys.readouterr()


@pytest.mark.parametrize("key,value,needle", [
    ("num_local_experts", "4", "config.json 'num_local_experts' must be an integer, got '4'"),
    ("num_local_experts", -4, "config.json 'num_local_experts' must be >= 1, got -4"),
    ("num_experts_per_tok", 8, "num_experts_per_tok (8) must be in 1..num_experts (4)"),
    ("num_experts_per_tok", 0, "config.json 'num_experts_per_tok' must be >= 1, got 0"),
    ("num_experts_per_tok", 2.0, "config.json 'num_experts_per_tok' must be an integer, got 2.0"),
])
def test_config_counts_of_the_wrong_type(moe, capsys, key, value, needle):
    _edit_json(moe / "config.json", _set(key, value))
    _fails(capsys, moe, "config.json", needle)


def test_interleaved_dense_layers_are_not_compared(dense_models, tmp_path, capsys):
    """Qwen-MoE's mlp_only_layers are dense: they have no experts to compare."""
    out = tmp_path / "qwen"
    upcycle(dense_models["llama"], out, num_experts=4, top_k=2, target="qwen3_moe", progress=False)
    _edit_json(out / "config.json", _set("mlp_only_layers", [1]))

    def densify(t):
        for name in [n for n in t if n.startswith("model.layers.1.mlp.")]:
            del t[name]
        for w in ("gate", "up"):
            t[f"model.layers.1.mlp.{w}_proj.weight"] = torch.zeros(64, 32)
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 64)

    _edit_tensors(out, densify)
    r = inspect_checkpoint(out)
    assert [s["layer"] for s in r["similarity"]] == [0]
