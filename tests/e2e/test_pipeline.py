"""The steps demo and repro share (dropup.pipeline): the evaluation windows line up with
training's, and a phase runs under torchrun as in one process."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dropup.pipeline import Scale, build_data, dense_init, evaluate_models, fit_eval, train_run, val_curve

TINY = Scale(corpus_mb=0.1, vocab_size=320, hidden=32, d_f=64, layers=2, heads=2, kv_heads=1, seq_len=32,
             global_batch=8, micro_batch=4, dense_steps=6, moe_steps=6, dense_lr=3e-3, moe_lr=1e-3,
             eval_interval=3, eval_batches=2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    data = build_data(out, TINY, seed=0)
    vocab = json.loads((data["code"] / "meta.json").read_text())["vocab_size"]
    return out, data, dense_init(out / "init", TINY, vocab, seed=0)


def test_evaluation_scores_the_windows_training_evaluates(study):
    out, data, init = study
    many = dataclasses.replace(TINY, eval_batches=10_000)
    assert 1 <= fit_eval(many, data).eval_batches < many.eval_batches  # more than this corpus's val splits hold
    s = fit_eval(TINY, data)
    assert s.eval_batches == 2
    final = train_run(out / "run", init, data, s, 6, 1e-3, seed=0)
    logged = val_curve(out / "run")
    assert [c["step"] for c in logged] == [3, 6]
    # `dropup eval` in float32 on the final export equals the trainer's own last evaluation (CPU: float32).
    ours = evaluate_models([final], data, s)[0]
    for d in data:
        assert ours["loss"][d] == pytest.approx(logged[-1]["loss"][d], abs=1e-5)
    with pytest.raises(Exception, match="fewer than one batch"):
        fit_eval(dataclasses.replace(TINY, micro_batch=10_000), data)


@pytest.mark.slow
def test_a_phase_under_torchrun_matches_one_process(study):
    out, data, init = study
    s = fit_eval(TINY, data)
    s = dataclasses.replace(fit_eval(TINY, data), eval_batches=1, eval_interval=2)
    one = val_curve(train_run(out / "one", init, data, s, 2, 1e-3, seed=0).parents[2])
    two = val_curve(train_run(out / "two", init, data, s, 2, 1e-3, seed=0, nproc=2).parents[2])
    assert [c["step"] for c in two] == [c["step"] for c in one]
    for a, b in zip(one, two):  # FSDP2 over gloo: the same samples, reductions in another order
        assert b["mean"] == pytest.approx(a["mean"], abs=1e-4)
