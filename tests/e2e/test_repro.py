"""`dropup repro`: the presets table, the verdicts on hand-made numbers, and the cpu-tiny study end
to end with a resume that re-runs only the unfinished phases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_timed

from dropup.errors import UserError
from dropup.repro import (CLAIMS, HELD, INCONCLUSIVE, NOT_HELD, PRESETS, judge, run_repro, variant_options,
                          with_overrides)


def test_every_preset_validates_and_budgets_are_consistent():
    assert {"cpu-tiny", "h200-10min", "h200-1h"} <= set(PRESETS)
    for name, p in PRESETS.items():
        p.validate()
        s = p.scale
        assert p.name == name
        assert s.global_batch % s.micro_batch == 0
        assert s.dense_steps > 0 and s.moe_steps > 0 and p.branch_steps > 0
        # A curve: at least two evaluations during MoE training before the one at its end.
        assert s.moe_steps // s.eval_interval >= 2
    with pytest.raises(UserError, match="eval_interval"):
        with_overrides(PRESETS["cpu-tiny"], ["eval_interval=6"])


def test_overrides_are_typed_and_bad_ones_refused():
    p = with_overrides(PRESETS["cpu-tiny"], ["moe_steps=16", "branch_steps=2"])
    assert p.scale.moe_steps == 16 and p.branch_steps == 2
    with pytest.raises(UserError, match="unknown key"):
        with_overrides(PRESETS["cpu-tiny"], ["nosuch=1"])
    with pytest.raises(UserError, match="micro_batch"):
        with_overrides(PRESETS["cpu-tiny"], ["micro_batch=3"])
    with pytest.raises(UserError, match="key=value"):
        with_overrides(PRESETS["cpu-tiny"], ["moe_steps"])
    # variant.KEY: an upcycling option of one extra MoE, read as YAML and checked before any work.
    v = with_overrides(PRESETS["cpu-tiny"], ["variant.reinit_stats=matrix", "variant.ratio=0.25"])
    assert v.variant == {"reinit_stats": "matrix", "ratio": 0.25}
    assert variant_options(v.variant) == {"method": "drop", "ratio": 0.25, "index_sampling": "shared",
                                          "reinit_stats": "matrix"}
    # The ablations are one --set each: per-layer r, silent re-drawn neurons, mixed layers.
    for item in ("variant.ratio=linear:0.25:0.75", "variant.reinit_down=zeros", "variant.reinit_scale=0.5"):
        variant_options(with_overrides(PRESETS["cpu-tiny"], [item]).variant)
    variant_options(with_overrides(PRESETS["cpu-tiny"], ["variant.target=qwen3_moe", "variant.moe_layers=every:2"]).variant)
    for bad, msg in (("variant.seed=3", "not an upcycling option"), ("variant.nosuch=1", "not an upcycling option"),
                     ("variant.ratio=2", "ratio"), ("variant.method=btx", "BTX")):
        with pytest.raises(UserError, match=msg):
            variant_options(with_overrides(PRESETS["cpu-tiny"], [bad]).variant)


def test_non_empty_out_is_refused_without_resume(tmp_path):
    (tmp_path / "x").write_text("mine")
    with pytest.raises(UserError, match="--resume"):
        run_repro(tmp_path, "cpu-tiny")
    with pytest.raises(UserError, match="no dropup repro study"):
        run_repro(tmp_path, "cpu-tiny", resume=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def _numbers(**change):
    """A study where every claim holds (the paper's story), with ``change`` applied."""
    end = {"naive": 3.0, "drop-0.5": 2.8, "drop-0.5-per-matrix": 2.85, "drop-1.0": 2.9, "noise": 2.95,
           "scratch": 3.3, "btx": 2.97}
    m = {"dense": 3.5, "start": {"naive": 3.5, "drop-0.5": 4.0, "drop-1.0": 6.0, "btx": 3.4},
         "early": {"naive": 3.2, "btx": 3.1, "drop-0.5": 3.4, "drop-1.0": 3.6, "scratch": 5.0},
         "end": end, "spread": 0.01, "early_spread": 0.01, "start_spread": 0.01,
         "jsd": {"naive": 0.01, "drop-0.5": 0.2, "scratch": 0.3}, "jsd_spread": 0.01,
         "dead": {"naive": 20, "drop-0.5": 1, "scratch": 0},
         "dense_continued": 3.1, "moe_at_dense_flops": {k: v + 0.05 for k, v in end.items()}}
    for k, v in change.items():
        m[k] = {**m[k], **v} if isinstance(v, dict) else v
    return m


def test_verdicts_on_hand_made_numbers():
    v = judge(_numbers())
    assert set(v) == set(CLAIMS)
    assert {k: x[0] for k, x in v.items()} == {k: HELD for k in CLAIMS}
    # C1: naive off the dense loss is not held; r = 1.0 below r = 0.5 beyond the spread is not held.
    assert judge(_numbers(start={"naive": 3.6}))["C1"][0] == NOT_HELD
    assert judge(_numbers(start={"drop-1.0": 3.9}))["C1"][0] == NOT_HELD
    # C3: drop-0.5 lowest by less than the seed spread is inconclusive; beaten beyond it, not held.
    assert judge(_numbers(end={"drop-0.5": 2.845}, spread=0.01))["C3"][0] == INCONCLUSIVE
    assert judge(_numbers(end={"drop-0.5": 2.845}, spread=0.001))["C3"][0] == HELD
    assert judge(_numbers(end={"drop-0.5": 2.9}))["C3"][0] == NOT_HELD
    # C4 and C5: scratch not last.
    low_scratch = judge(_numbers(end={"scratch": 2.5}))
    assert low_scratch["C4"][0] == NOT_HELD and low_scratch["C5"][0] == NOT_HELD
    # C2: a method other than naive/BTX lowest early.
    assert judge(_numbers(early={"drop-0.5": 2.0}))["C2"][0] == NOT_HELD
    # C6: naive's JSD above the others is not held; within the JSD spread inconclusive.
    assert judge(_numbers(jsd={"naive": 0.5}))["C6"][0] == NOT_HELD
    assert judge(_numbers(jsd={"naive": 0.195}))["C6"][0] == INCONCLUSIVE
    # C7: the index schemes within the spread: inconclusive; the reason names the lower one otherwise.
    assert judge(_numbers(end={"drop-0.5-per-matrix": 2.805}))["C7"][0] == INCONCLUSIVE
    assert "shared ends lower" in judge(_numbers())["C7"][1]
    # C8: a MoE behind the dense model at equal FLOPs is not held.
    assert judge(_numbers(moe_at_dense_flops={"naive": 3.5}))["C8"][0] == NOT_HELD


def _repro(out, *extra):
    """The study as a subprocess, and the CPU seconds it took (``run_timed``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return run_timed([sys.executable, "-m", "dropup", "repro", "--preset", "cpu-tiny", "--out", str(out), *extra],
                     env=env, capture_output=True, text=True, timeout=600)


VARIANT_SET = ("--set", "variant.reinit_stats=matrix")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One cpu-tiny study with a variant, shared: the end-to-end test checks it and resumes it (to
    the same numbers, asserted), the kill test compares an interrupted study with it (starting from
    its data phase), the seed-model test takes its seed model and datasets as the user's."""
    out = tmp_path_factory.mktemp("repro") / "study"
    r, cpu_seconds = _repro(out, *VARIANT_SET)
    first = json.loads((out / "results.json").read_text()) if r.returncode == 0 else None
    return out, r, cpu_seconds, first


@pytest.mark.slow
def test_cpu_tiny_end_to_end_then_resume_reruns_only_unfinished_phases(tiny_study):
    out, r, cpu_seconds, _ = tiny_study
    assert r.returncode == 0, r.stderr[-3000:]
    assert cpu_seconds < 60, cpu_seconds
    report = (out / "report.md").read_text()
    for k in CLAIMS:
        assert f"## {k}\n" in report
    verdicts = [line for line in report.splitlines() if line.startswith("Verdict: ")]
    assert len(verdicts) == len(CLAIMS)
    assert all(v.removeprefix("Verdict: **").removesuffix("**") in (HELD, NOT_HELD, INCONCLUSIVE) for v in verdicts)
    for png in ("loss_per_domain.png", "diff_to_naive.png", "routing/shares.png", "routing/jsd.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in report
    first = json.loads((out / "results.json").read_text())
    methods = ["naive", "drop-0.5", "drop-0.5-per-matrix", "drop-1.0", "noise", "scratch", "btx"]
    assert list(first["curves"]) == [*methods, "naive-s1", "drop-0.5-s1", "variant", "dense-continued"]
    assert "Variant (an extra MoE, no claim judged on it): drop-0.5 with reinit_stats=matrix." in report
    assert first["curves"]["variant"][0]["mean"] != first["curves"]["drop-0.5"][0]["mean"]
    # Naive upcycling starts at the dense model's loss; every curve has its saved checkpoints.
    assert abs(first["numbers"]["start"]["naive"] - first["numbers"]["dense"]) < 1e-4
    assert all(len(c) == 1 + 3 for c in first["curves"].values())

    # Without --resume a finished study is not overwritten.
    again, _ = _repro(out)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr

    # A kill after dense-continued's training: its evaluation and the routing analysis unfinished.
    for name in ("eval-dense-continued", "routing", "train-dense-continued"):
        (out / "phases" / f"{name}.json").unlink()
    r, _ = _repro(out, "--resume", *VARIANT_SET)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads((out / "results.json").read_text())
    assert second["phases_run_now"] == ["train-dense-continued", "eval-dense-continued", "routing"]
    # Finished phases' numbers are the recorded ones, bit for bit; the re-run phases reproduce theirs.
    for name in [*methods, "naive-s1", "drop-0.5-s1"]:
        assert second["curves"][name] == first["curves"][name]
    assert second["numbers"] == first["numbers"]
    assert second["verdicts"] == first["verdicts"]


@pytest.mark.slow
def test_cpu_tiny_killed_mid_phase_resumes_to_the_same_numbers(tmp_path, tiny_study):
    """SIGKILL inside a training phase (no chance to clean up), then --resume: the study ends with
    the numbers of an uninterrupted run, re-running only the phase that was cut and those after it."""
    import signal

    ref_out, ref, _, first = tiny_study
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    # The study starts with the reference's finished data phase (its marker names the reference's
    # datasets, read only), so the machine's corpus is not harvested a second time.
    (out / "phases").mkdir(parents=True)
    for f in ("repro.json", "phases/data.json"):
        shutil.copy(ref_out / f, out / f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dropup", "repro", "--preset", "cpu-tiny", "--out", str(out),
                             "--resume", *VARIANT_SET],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the trainer's first log line of the phase: inside it, its marker unwritten
        if line.startswith("== train-noise"):
            break
    for line in proc.stdout:
        if line.lstrip().startswith("step"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = {p.stem for p in (out / "phases").glob("*.json")}
    assert "train-drop-1.0" in done and "train-noise" not in done
    r, _ = _repro(out, "--resume", *VARIANT_SET)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads((out / "results.json").read_text())
    assert second["phases_run_now"][0] == "train-noise" and "train-drop-1.0" not in second["phases_run_now"]
    assert "data" not in second["phases_run_now"]
    assert second["curves"] == first["curves"]
    assert second["numbers"] == first["numbers"] and second["verdicts"] == first["verdicts"]


@pytest.mark.slow
def test_seed_model_and_given_datasets_replace_the_seed_and_the_corpus(tmp_path, tiny_study):
    """--seed-model: every MoE starts from the user's dense model (with its tokenizer), and --data
    gives the domains; no corpus is harvested and no seed is trained."""
    ref_out, ref, _, _ = tiny_study
    assert ref.returncode == 0, ref.stderr[-3000:]
    # The user's model and datasets: the cpu-tiny study's trained seed, with its tokenizer beside
    # it, and its prepared domains (a corpus that gives every domain a val split).
    data = {d: Path(p) for d, p in json.loads((ref_out / "phases" / "data.json").read_text())["data"].items()}
    seed_model = shutil.copytree(json.loads((ref_out / "phases" / "train-seed.json").read_text())["final"],
                                 tmp_path / "mine")
    for f in (ref_out / "tokenizer").iterdir():
        shutil.copy(f, seed_model / f.name)
    out = tmp_path / "study"
    r, _ = _repro(out, "--seed-model", str(seed_model), "--data", *(str(p) for p in data.values()))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["seed_model"] == str(seed_model.resolve())
    assert not (out / "corpus").exists() and not (out / "phases" / "train-seed.json").exists()
    assert list(res["epochs"]) == ["moe"]
    assert abs(res["numbers"]["start"]["naive"] - res["numbers"]["dense"]) < 1e-4
    assert f"Every MoE starts from the dense model {seed_model.resolve()}" in (out / "report.md").read_text()
    # --data without --seed-model, and a seed model without a tokenizer: one line, exit 2, nothing written.
    bad, _ = _repro(tmp_path / "bad1", "--data", str(data["code"]))
    assert bad.returncode == 2 and "--seed-model" in bad.stderr and not (tmp_path / "bad1").exists()
    (seed_model / "tokenizer.json").unlink()
    bad, _ = _repro(tmp_path / "bad2", "--seed-model", str(seed_model))
    assert bad.returncode == 2 and "tokenizer.json" in bad.stderr and not (tmp_path / "bad2").exists()
