"""Aux-loss-free balancing in `dropup train` (loss.bias_update_rate, DeepSeek-V3's rule): the
selection biases balance a skewed router, move only in steps of the rate from zero, survive a
resume bit for bit, are exported beside the model and read back by dropup's loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import VOCAB, _config, _metrics, _write_yaml, datasets  # noqa: F401 (a fixture)

from dropup.analysis.routing import expert_counts
from dropup.analysis.specialisation import route_model
from dropup.cli import main as cli_main
from dropup.hub.config import ModelConfig
from dropup.hub.names import router_bias_name
from dropup.model.decoder import build_model, moe_layers, selection_biases
from dropup.model.io import ROUTER_BIAS_FILE, load_model, save_model
from dropup.train.config import PRESETS, load_config
from dropup.train.loop import train
from dropup.train.losses import bias_step

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
RATE = 2.0**-6  # a power of two: every bias is an exact multiple of it in float32


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> Path:
    """moe-tiny whose routers prefer expert 0 (then 1) for every token: one embedding dimension is
    the same for all tokens and the routers read it with weight 2 (1) for expert 0 (1), on top of
    random weights that keep the tokens' choices otherwise diverse. Left alone (rate 0, small LR)
    it keeps a max/mean load near 3."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf({**PRESETS["moe-tiny"], "vocab_size": VOCAB}))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.05
        for moe in moe_layers(model):
            moe.router.weight.normal_(0, 0.3)
            moe.router.weight[:, 0] = torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, 0])
    path = tmp_path_factory.mktemp("skewed") / "moe"
    save_model(model, path)
    return path


def _yaml(tmp: Path, datasets, init: Path, name: str, rate: float, **over) -> Path:
    """The config of run ``tmp/name`` from ``init``: no balance loss, so only the bias balances,
    and a small LR, so the routers stay skewed on their own."""
    cfg = _config(tmp, datasets, **{"model.preset": None, "model.init": str(init), "loss.aux_loss_coef": 0.0,
                                    "loss.bias_update_rate": rate, "optim.lr": 1e-4, "out_dir": str(tmp / name),
                                    "eval_interval": 0, **over})
    return _write_yaml(tmp / f"{name}.yaml", cfg)


def _run(tmp: Path, datasets, init: Path, name: str, rate: float, **over) -> Path:
    return train(load_config(_yaml(tmp, datasets, init, name, rate, **over)))


def _biases(export: Path) -> list[torch.Tensor]:
    """The exported biases in layer order (moe-tiny: mixtral, every layer MoE)."""
    tensors = load_file(str(export / ROUTER_BIAS_FILE))
    return [tensors[router_bias_name("mixtral", i)] for i in range(len(tensors))]


def test_bias_step_is_the_sign_rule():
    loads = torch.tensor([[10.0, 2.0, 4.0, 0.0], [4.0, 4.0, 4.0, 4.0]], dtype=torch.float64)  # mean 4
    assert bias_step(loads, RATE).tolist() == [[-RATE, RATE, 0.0, RATE], [0.0, 0.0, 0.0, 0.0]]
    assert bias_step(loads, RATE).dtype == torch.float32


def test_bias_balances_a_skewed_router_and_is_exported(tmp_path, datasets, skewed):
    steps = 20
    runs = {rate: _run(tmp_path, datasets, skewed, f"r{rate}", rate, steps=steps, save_interval=0)
            for rate in (0.0, RATE)}

    def late_max_mean(run: Path) -> float:  # the last 5 steps, averaged over both layers
        records = _metrics(run)[-5:]
        return sum(sum(r["router_max_mean"]) / len(r["router_max_mean"]) for r in records) / len(records)

    plain, balanced = late_max_mean(runs[0.0]), late_max_mean(runs[RATE])
    assert plain > 2.5, plain  # the skew stays without the bias...
    assert balanced < 0.8 * plain, (plain, balanced)  # ...and the bias takes it down (measured: 2.97 -> 2.06)
    assert "router_bias_max" not in _metrics(runs[0.0])[-1]

    export = runs[RATE] / "ckpt" / f"step_{steps}" / "model"
    assert not (runs[0.0] / "ckpt" / f"step_{steps}" / "model" / "dropup").exists()  # no bias, no file
    biases = _biases(export)
    assert len(biases) == 2
    for b in biases:
        steps_of_rate = b / RATE
        assert torch.equal(steps_of_rate, steps_of_rate.round()) and steps_of_rate.abs().max() <= steps
        assert b[0] < 0  # the favoured expert is pushed down
    assert _metrics(runs[RATE])[-1]["router_bias_max"] == [b.abs().max().item() for b in biases]
    assert f"`{ROUTER_BIAS_FILE}`. transformers ignores that file" in (export / "README.md").read_text()
    assert "selection bias" not in (runs[0.0] / "ckpt" / f"step_{steps}" / "model" / "README.md").read_text()
    # dropup's loader applies the file; without it the model routes (and predicts) otherwise.
    ours = load_model(export)
    for a, b in zip(selection_biases(ours), biases):
        assert torch.equal(a, b)
    shutil.copytree(export, tmp_path / "plain", ignore=shutil.ignore_patterns("dropup"))
    plain_model = load_model(tmp_path / "plain")
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - plain_model(ids)).abs().max() > 1e-4
        # `dropup analyze routing` counts the biased choice, as the MoE layers route.
        _, logits = ours.hidden_states(ids)
    sample = [ids.flatten().numpy()]
    counts = {name: route_model(m, sample, 16, 2, [])[0].counts[:, 0] for name, m in (("ours", ours),
                                                                                      ("plain", plain_model))}
    assert torch.equal(counts["ours"], expert_counts(logits, 2, 8, biases=biases).long())
    assert not torch.equal(counts["ours"], counts["plain"])


def test_bias_resumes_bit_for_bit_and_moves_in_steps_of_the_rate(tmp_path, datasets, skewed):
    run = _run(tmp_path, datasets, skewed, "run", RATE, steps=4, save_interval=1, keep_last=4)
    ckpt = run / "ckpt"
    per_step = [torch.stack(_biases(ckpt / f"step_{s}" / "model")) for s in range(1, 5)]
    # From exactly zero, by exactly -rate, 0 or +rate per expert and step.
    for before, after in zip([torch.zeros_like(per_step[0])] + per_step, per_step):
        assert set((after - before).flatten().tolist()) <= {-RATE, 0.0, RATE}
    assert per_step[-1].abs().sum() > 0
    weights = load_file(str(ckpt / "step_4" / "model" / "model.safetensors"))
    straight = _metrics(run)

    for s in (3, 4):  # as if killed after step 2's checkpoint
        shutil.rmtree(ckpt / f"step_{s}")
    train(load_config(tmp_path / "run.yaml"), resume=True)
    assert torch.equal(torch.stack(_biases(ckpt / "step_4" / "model")), per_step[-1])
    resumed = load_file(str(ckpt / "step_4" / "model" / "model.safetensors"))
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)
    for a, b in zip(straight, _metrics(run)):
        for key in ("loss", "grad_norm", "router_load", "router_bias_max"):
            assert a[key] == b[key], (a["step"], key)


def test_resume_from_a_checkpoint_without_biases_starts_them_at_zero(tmp_path, datasets, skewed):
    run = _run(tmp_path, datasets, skewed, "run", 0.0, steps=4, save_interval=2)
    assert not (run / "ckpt" / "step_2" / "model" / "dropup").exists()
    shutil.rmtree(run / "ckpt" / "step_4")
    cfg = load_config(tmp_path / "run.yaml", ["loss.bias_update_rate=0.015625"])  # a free change on resume
    train(cfg, resume=True)
    first = _metrics(run)[2]  # the first record after the resume
    assert first["step"] == 3 and first["config_changes"] == {"loss.bias_update_rate": [0.0, RATE]}
    two_steps = torch.stack(_biases(run / "ckpt" / "step_4" / "model")) / RATE
    assert set(two_steps.flatten().tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}  # two updates from zero


@pytest.mark.parametrize("value, message", [
    ("-0.001", "loss.bias_update_rate"),
    ("fast", "loss.bias_update_rate must be a number"),
    (".nan", "loss.bias_update_rate"),
])  # fmt: skip
def test_bad_rate_is_one_line_exit_2(tmp_path, datasets, capsys, value, message):
    path = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, datasets))
    assert cli_main(["train", "--config", str(path), "--set", f"loss.bias_update_rate={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run" / "ckpt").exists()


def test_rate_on_a_dense_model_is_one_line_exit_2(tmp_path, datasets, capsys):
    path = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, datasets, **{"model.preset": "dense-tiny",
                                                                           "loss.bias_update_rate": RATE}))
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aux-loss-free balancing needs an MoE" in err, err
    assert not (tmp_path / "run" / "ckpt").exists()


@pytest.mark.slow
def test_two_processes_hold_the_one_process_biases(tmp_path, datasets, skewed):
    """Under torchrun the loads are summed over the ranks before the update: 2 processes over gloo
    export exactly the biases of 1 process with the same global batch."""
    import subprocess
    import sys

    from test_train import ENV

    one = _run(tmp_path, datasets, skewed, "one", RATE, steps=4, save_interval=4)
    config = _yaml(tmp_path, datasets, skewed, "two", RATE, steps=4, save_interval=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dropup", "train", "--config", str(config)]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = (torch.stack(_biases(r / "ckpt" / "step_4" / "model")) for r in (one, tmp_path / "two"))
    assert a.abs().sum() > 0 and torch.equal(a, b)
    for x, y in zip(_metrics(one), _metrics(tmp_path / "two")):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]) and x["router_load"] == y["router_load"]


@pytest.mark.parametrize("mode", ["pooled", "global-batch"])
def test_bias_works_beside_the_balance_loss(tmp_path, datasets, skewed, mode):
    run = _run(tmp_path, datasets, skewed, "run", RATE, steps=3, save_interval=3,
               **{"loss.aux_loss_coef": 0.02, "loss.balance_mode": mode})
    m = _metrics(run)
    assert all(r["aux_loss"] > 0 and r["loss"] == pytest.approx(r["lm_loss"] + 0.02 * r["aux_loss"]) for r in m)
    assert torch.stack(_biases(run / "ckpt" / "step_3" / "model")).abs().sum() > 0
