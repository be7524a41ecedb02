"""Training upcycled MoEs of the layouts beyond one-tensor-per-expert-everywhere: a Qwen3-MoE
whose middle layer stayed dense (--moe-layers) and a GraniteMoE (stacked experts, Granite's
multipliers). The steps run, the logs name the MoE layers, and each export is the same model to
transformers."""

from __future__ import annotations

import json
import math

import torch
from conftest import build_dense, load_tensors
from test_train import VOCAB, _config, _metrics, _write_yaml, datasets  # noqa: F401 (a fixture)

from dropup import upcycle
from dropup.model.io import load_model
from dropup.train.config import load_config
from dropup.train.loop import train


def _train_two_steps(tmp_path, datasets, init, **over):  # noqa: F811
    cfg = _config(tmp_path, datasets, steps=2, save_interval=2, eval_interval=2,
                  **{"model.preset": None, "model.init": str(init), "device": "cpu", "precision": "fp32",
                     "compile": False, **over})
    return train(load_config(_write_yaml(tmp_path / "run.yaml", cfg)))


def _same_model_in_transformers(export):
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(export, dtype=torch.float32)(ids)
        assert (ours - hf.eval()(ids).logits).abs().max().item() <= 1e-5


def test_two_steps_of_a_mixed_model_and_its_export(tmp_path, datasets):  # noqa: F811
    dense = build_dense(tmp_path / "dense", "qwen3", vocab=VOCAB, layers=3)
    init = tmp_path / "moe"
    upcycle(dense, init, method="drop", ratio=0.5, num_experts=4, top_k=2, moe_layers="0,2", progress=False)
    run = _train_two_steps(tmp_path, datasets, init, **{"analysis.routing": True, "analysis.tokens": 200})
    records = _metrics(run)
    assert len(records) == 2 and all(r["router_layers"] == [0, 2] for r in records)
    assert all(len(r["router_load"]) == len(r["router_entropy"]) == 2 for r in records)
    routing = [json.loads(line) for line in (run / "analysis" / "routing.jsonl").read_text().splitlines()]
    assert [r["layers"] for r in routing] == [[0, 2]] and len(routing[0]["jsd"]) == 2
    export = run / "ckpt" / "step_2" / "model"
    assert json.loads((export / "config.json").read_text())["mlp_only_layers"] == [1]
    # The dense layer was trained too, and is written under the dense names.
    before, after = load_tensors(init), load_tensors(export)
    name = "model.layers.1.mlp.down_proj.weight"
    assert name in after and not torch.equal(before[name].float(), after[name].float())
    _same_model_in_transformers(export)


def test_two_steps_of_a_granitemoe_and_its_export(tmp_path, datasets):  # noqa: F811
    dense = build_dense(tmp_path / "dense", "granite", vocab=VOCAB)
    init = tmp_path / "moe"
    upcycle(dense, init, method="drop", ratio=0.5, num_experts=4, top_k=2, progress=False)
    run = _train_two_steps(tmp_path, datasets, init)
    assert all(r["router_layers"] == [0, 1] and math.isfinite(r["loss"]) for r in _metrics(run))
    export = run / "ckpt" / "step_2" / "model"
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["model_type"] == "granitemoe" and cfg["logits_scaling"] == 2.5 and cfg["residual_multiplier"] == 0.4
    before, after = load_tensors(init), load_tensors(export)
    stacked = "model.layers.0.block_sparse_moe.input_linear.weight"
    assert after[stacked].shape == before[stacked].shape and not torch.equal(before[stacked], after[stacked])
    _same_model_in_transformers(export)
