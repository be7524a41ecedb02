"""--ratio per layer (issue 15, item 3): one value, one per layer, or linear:A:B over depth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_dense, load_tensors, upcycle_refused
from test_upcycle import _changed_neurons, _digest, _expert, _ffn

from dropup import upcycle
from dropup.analysis.experts import format_report, inspect_checkpoint
from dropup.cli import main
from dropup.convert import ratios
from dropup.convert.surgery import num_reinit
from dropup.convert.upcycle import check_ratio as _check

D_F, LAYERS = 320, 5


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """Five layers of 320 neurons: a schedule over depth has distinct values and counts."""
    return build_dense(tmp_path_factory.mktemp("deep") / "llama", "llama", hidden=32, d_f=D_F, layers=LAYERS)


def _run(src, out, **kw):
    return upcycle(src, out, progress=False, **kw)


def _changed_per_layer(src: Path, out: Path, experts: int) -> list[list[int]]:
    """How many neurons of each expert of each layer differ from the dense FFN, checking that
    gate, up and down change the same neurons (shared index sets)."""
    moe, dense = load_tensors(out), load_tensors(src)
    counts = []
    for layer in range(LAYERS):
        base, row = _ffn(dense, layer), []
        for e in range(experts):
            ex = _expert(moe, "mixtral", layer, e)
            changed = {m: _changed_neurons(ex[m], base[m], m) for m in ex}
            assert torch.equal(changed["gate"], changed["up"]) and torch.equal(changed["gate"], changed["down"])
            row.append(len(changed["gate"]))
        counts.append(row)
    return counts


def test_parse_gives_one_canonical_form():
    assert ratios.parse(0.5, _check) == 0.5 and type(ratios.parse(np.float32(0.25), _check)) is float
    assert ratios.parse("0.5", _check) == 0.5
    assert ratios.parse(" 0.1, 0.2 ,0.3", _check) == (0.1, 0.2, 0.3)
    assert ratios.parse([0, 1], _check) == (0.0, 1.0)
    assert ratios.parse("Linear:0.25:1", _check) == "linear:0.25:1.0"
    # endpoints exact, the rest A + (B - A) * l / (L - 1); one layer gets A
    got = ratios.per_layer("linear:0.1:0.9", 5)
    assert got[0] == 0.1 and got[-1] == 0.9
    assert got == pytest.approx([0.1 + 0.8 * l / 4 for l in range(5)], abs=1e-15)
    assert ratios.per_layer("linear:0.7:0.2", 1) == (0.7,)
    assert ratios.per_layer(0.3, 3) == (0.3, 0.3, 0.3)
    assert ratios.per_layer((0.1, 0.2), 2) == (0.1, 0.2)


def test_drop_counts_follow_a_linear_schedule(deep_llama, tmp_path):
    prov = _run(deep_llama, tmp_path / "moe", ratio="linear:0.1:0.9", num_experts=3)
    want = [32, 96, 160, 224, 288]  # floor(r * 320) for r = 0.1, 0.3, 0.5, 0.7, 0.9
    assert [num_reinit(D_F, r) for r in prov["ratio_per_layer"]] == want
    assert _changed_per_layer(deep_llama, tmp_path / "moe", 3) == [[n] * 3 for n in want]
    on_disk = json.loads((tmp_path / "moe" / "upcycling.json").read_text())
    assert on_disk["options"]["ratio"] == "linear:0.1:0.9"
    assert "- ratio: linear:0.1:0.9 (per layer)" in (tmp_path / "moe" / "README.md").read_text()
    assert on_disk["ratio_per_layer"] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    for layer, n in enumerate(want):
        for rec in on_disk["layers"][layer]:
            assert rec["intact_fraction"] == pytest.approx(1 - n / D_F)
            assert rec["gate"]["reinit_fraction"] == n / D_F


def test_drop_and_noise_counts_follow_a_list(deep_llama, tmp_path, capsys):
    spec = "0,0.25,1,0.5,0.75"
    assert main(["upcycle", str(deep_llama), str(tmp_path / "drop"), "--ratio", spec, "--num-experts", "2",
                 "--quiet"]) == 0
    want = [0, 80, 320, 160, 240]
    assert _changed_per_layer(deep_llama, tmp_path / "drop", 2) == [[n] * 2 for n in want]
    moe, dense = load_tensors(tmp_path / "drop"), load_tensors(deep_llama)
    # r = 0 in layer 0: its experts are the dense FFN itself
    assert all(torch.equal(_expert(moe, "mixtral", 0, e)[m], _ffn(dense, 0)[m]) for e in range(2)
               for m in ("gate", "up", "down"))
    prov = json.loads((tmp_path / "drop" / "upcycling.json").read_text())
    assert prov["options"]["ratio"] == [0.0, 0.25, 1.0, 0.5, 0.75] == prov["ratio_per_layer"]
    _run(deep_llama, tmp_path / "noise", method="noise", ratio=[0.5, 0.0, 0.25, 0.25, 1.0], num_experts=2)
    assert _changed_per_layer(deep_llama, tmp_path / "noise", 2) == [[n] * 2 for n in (160, 0, 80, 80, 320)]


def test_a_constant_list_builds_the_single_values_model(deep_llama, tmp_path):
    single = _run(deep_llama, tmp_path / "single", ratio=0.5, num_experts=2)
    listed = _run(deep_llama, tmp_path / "listed", ratio=[0.5] * LAYERS, num_experts=2)
    scheduled = _run(deep_llama, tmp_path / "linear", ratio="linear:0.5:0.5", num_experts=2)
    assert _digest(tmp_path / "single") == _digest(tmp_path / "listed") == _digest(tmp_path / "linear")
    # a single value keeps the record of before: no per-layer list
    assert "ratio_per_layer" not in single and listed["ratio_per_layer"] == [0.5] * LAYERS
    assert single["layers"] == listed["layers"] == scheduled["layers"]


def test_a_schedule_is_deterministic_across_threads_and_shards(deep_llama, tmp_path):
    opts = dict(ratio="linear:0.2:0.8", num_experts=4, seed=5)
    _run(deep_llama, tmp_path / "a", **opts)
    _run(deep_llama, tmp_path / "b", threads=1, **opts)
    _run(deep_llama, tmp_path / "c", threads=3, max_shard_size="300KB", **opts)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(list((tmp_path / "c").glob("*.safetensors"))) > 3
    a, c = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "c")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_verify_is_exact_only_where_every_layer_is(dense_models, tmp_path):
    exact = _run(dense_models["llama"], tmp_path / "zeros", ratio="0,0", verify=True)
    assert exact["verify"]["exact"] and exact["verify"]["matches_dense"]
    mixed = _run(dense_models["llama"], tmp_path / "mixed", ratio="0,0.5", verify=True)
    assert not mixed["verify"]["exact"]
    assert "re-draws r = 0.0,0.5 of each expert's neurons" in mixed["verify"]["not_exact_because"]


def test_inspect_shows_r_per_layer(deep_llama, tmp_path, capsys):
    _run(deep_llama, tmp_path / "moe", ratio="linear:0:1", num_experts=2)
    r = inspect_checkpoint(tmp_path / "moe")
    assert r["upcycling"]["ratio"] == "linear:0.0:1.0"
    assert r["upcycling"]["ratio_per_layer"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    text = format_report(r)
    assert "drop (r = linear:0.0:1.0 per layer, shared indices" in text
    rows = [line.split() for line in text.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("0", "0.0000"), ("1", "0.2500"), ("2", "0.5000"),
                                                  ("3", "0.7500"), ("4", "1.0000")]
    # r = 0: the experts are identical; r = 1: no neuron is shared
    assert float(rows[0][4]) == 1.0 and float(rows[-1][4]) == 0.0
    assert main(["inspect", str(tmp_path / "moe"), "--no-similarity"]) == 0
    assert "r per layer  0 0.25 0.5 0.75 1" in capsys.readouterr().out


@pytest.mark.parametrize("args, says", [
    (["--ratio", "0.1,0.2,0.3"], "--ratio lists 3 values, but SRC has 2 layers; give one per layer"),
    (["--ratio", "0.2,1.5"], "each value of --ratio 0.2,1.5 must be >= 0 and <= 1, got 1.5"),
    (["--ratio", "linear:0:2"], "each end of --ratio linear:0:2 must be >= 0 and <= 1, got 2.0"),
    (["--ratio=-0.1"], "--ratio must be >= 0 and <= 1, got -0.1"),
    (["--ratio", "half"], "--ratio 'half' is not a ratio; write a number (0.5), one per layer"),
    (["--ratio", "0.1,,0.2"], "--ratio '0.1,,0.2' is not a list of numbers"),
    (["--ratio", "linear:0.5"], "--ratio 'linear:0.5' is not a schedule: write linear:A:B"),
    (["--ratio", "linear:0.1:0.2:0.3"], "is not a schedule"),
    (["--ratio", "0.1,nan"], "each value of --ratio 0.1,nan must be a finite number, got nan"),
    (["--ratio", "0.1,0.2", "--method", "naive"],
     "--ratio 0.1,0.2 sets r per layer, but --method naive does not use --ratio (drop and noise do)"),
    (["--ratio", "linear:0:1", "--method", "scratch"], "--method scratch does not use --ratio"),
])
def test_bad_ratio_specs(capsys, dense_models, tmp_path, args, says):
    upcycle_refused(capsys, dense_models["llama"], tmp_path, args, says)
