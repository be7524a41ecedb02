"""The run plan: what a config, the model and the processes make of a run, and its errors."""

from __future__ import annotations

import dataclasses

import pytest

from dropup.errors import UserError
from dropup.hub.config import ModelConfig
from dropup.train.config import PRESETS, load_config
from dropup.train.plan import RunPlan, plan_run


def _cfg(*sets: str):
    return load_config(None, ["model.preset=moe-tiny", "data.datasets=[{path: x}]", *sets])


def _model(preset: str = "moe-tiny", **over) -> ModelConfig:
    return ModelConfig.from_hf({**PRESETS[preset], "vocab_size": 64, **over})


def test_cpu_run_from_steps():
    plan = plan_run(_cfg("steps=40", "batch.global_batch=8", "batch.micro_batch=2", "data.seq_len=32",
                         "optim.lr=3e-3"), _model(), world=1, device_type="cpu")
    assert plan == RunPlan(seq_len=32, global_batch=8, micro_batch=2, world=1, accum=4, total_steps=40,
                           bf16=False, compile=False, activation_checkpointing="none", checkpoint_every=1,
                           lr_max=3e-3, lr_min=3e-3 / 10, aux_coef=0.02)
    assert plan.tokens_per_step == 8 * 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.accum = 2


def test_gpu_run_from_tokens_on_several_processes():
    # seq_len defaults to the model's context; tokens round down to whole steps.
    cfg = _cfg("tokens=1_000_000", "batch.global_batch=16", "batch.micro_batch=2", "loss.aux_loss_coef=0.01")
    plan = plan_run(cfg, _model(), world=4, device_type="cuda")
    assert plan.seq_len == 128 and plan.accum == 2 and plan.total_steps == 1_000_000 // (16 * 128) == 488
    assert plan.bf16 and plan.compile and plan.aux_coef == 0.01
    assert (plan.lr_max, plan.lr_min) == (2e-4, pytest.approx(2e-5))  # the paper's MoE LRs


def test_explicit_choices_override_the_device_defaults():
    cfg = _cfg("steps=1", "batch.global_batch=2", "batch.micro_batch=2", "precision=fp32", "compile=false",
               "optim.lr=1e-3", "optim.min_lr=0")
    plan = plan_run(cfg, _model(), world=1, device_type="cuda")
    assert not plan.bf16 and not plan.compile and plan.lr_min == 0.0
    plan = plan_run(_cfg("steps=1", "precision=bf16", "compile=true"), _model(), world=1, device_type="cpu")
    assert plan.bf16 and plan.compile


def test_dense_defaults():
    # The paper's dense LRs; the aux coefficient is the checkpoint's (unused by a dense model).
    plan = plan_run(_cfg("steps=1"), _model("dense-tiny", router_aux_loss_coef=0.005), world=1, device_type="cpu")
    assert (plan.lr_max, plan.lr_min) == (3e-4, pytest.approx(3e-5))
    assert plan.aux_coef == 0.005


def test_global_batch_must_split_over_the_processes():
    cfg = _cfg("steps=1", "batch.global_batch=8", "batch.micro_batch=2")
    assert plan_run(cfg, _model(), world=2, device_type="cpu").accum == 2
    with pytest.raises(UserError, match=r"^batch.global_batch \(8\) must be a multiple of batch.micro_batch "
                                        r"\(2\) times the number of processes \(3\)$"):
        plan_run(cfg, _model(), world=3, device_type="cpu")


def test_token_budget_below_one_batch():
    cfg = _cfg("tokens=255", "batch.global_batch=8", "batch.micro_batch=2", "data.seq_len=32")
    with pytest.raises(UserError, match=r"^tokens \(255\) is less than one global batch \(8 x 32 tokens\)$"):
        plan_run(cfg, _model(), world=1, device_type="cpu")
    assert plan_run(_cfg("tokens=256", "batch.global_batch=8", "batch.micro_batch=2", "data.seq_len=32"),
                    _model(), world=1, device_type="cpu").total_steps == 1
