"""Activation checkpointing (``activation_checkpointing: none | full | selective`` and
``activation_checkpointing_every``): the same loss, router logits and gradients as the plain
layers, bit for bit; fewer activations kept; routing recorded once although a checkpointed layer
runs its forward twice; per-layer torch.compile; and ``dropup train`` with the keys set.

Bit-equal, not merely close, in fp32 (and under CPU bf16 autocast): a checkpointed layer's
backward recomputes its forward with the same kernels on the same inputs in the same order (on
the CPU those are deterministic), and the saved ops of the selective policy hand back the very
tensors of the first forward, so every backward kernel receives identical bytes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from test_train import ENV, _config, _metrics, _write_yaml, datasets  # noqa: F401 (a fixture)
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dropup.analysis.routing import RouterStats
from dropup.cli import main as cli_main
from dropup.hub.config import ModelConfig
from dropup.model.decoder import ACTIVATION_CHECKPOINTING, build_model, moe_layers
from dropup.options import choices
from dropup.train.config import PRESETS, TrainConfig
from dropup.train.losses import load_balancing_loss, router_z_loss

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
MODES = [("full", 1), ("full", 2), ("selective", 1), ("selective", 2)]


# Beside the plain dense and MoE shapes: attention under an explicit mask (a sliding window shorter
# than the sequence), and an MoE with an always-active shared expert.
_VARIANTS = {"dense": ("dense-tiny", {}), "moe": ("moe-tiny", {}),
             "sliding": ("dense-tiny", {"model_type": "mistral", "sliding_window": 8}),
             "shared": ("moe-tiny", {"model_type": "qwen2_moe", "num_experts": 8, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 16})}


def _model(kind: str, layers: int = 3, dtype: torch.dtype = torch.float32, impl: str = "loop", hidden: int = 32):
    preset, over = _VARIANTS[kind]
    cfg = ModelConfig.from_hf({**PRESETS[preset], "vocab_size": 48, "hidden_size": hidden,
                               "intermediate_size": 2 * hidden, "num_hidden_layers": layers, **over})
    torch.manual_seed(0)
    model = build_model(cfg, dtype=dtype)
    model.set_moe_impl(impl)
    with torch.no_grad():  # a non-zero selection bias: the recomputed routing must follow it too
        for moe in moe_layers(model):
            moe.selection_bias.normal_(0, 0.05)
    return model


def _step(model, autocast: bool = False):
    """Loss, router logits, aux and z loss, routing statistics and every gradient of one step."""
    ids = torch.randint(0, 48, (2, 17), generator=torch.Generator().manual_seed(1))
    k, e = model.config.num_experts_per_tok, model.config.num_experts
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        lm, logits = model(ids[:, :-1], return_router_logits=True, targets=ids[:, 1:])
    biases = [m.selection_bias for m in moe_layers(model)]
    aux = load_balancing_loss(logits, k, e, biases=biases) if logits else torch.zeros(())
    z = router_z_loss(logits) if logits else torch.zeros(())
    stats = RouterStats()
    if logits:
        stats.add(logits, k, e, biases)
    (lm + 0.02 * aux + 1e-3 * z).backward()
    # Nothing is left behind: a recomputation in the backward must not store its router logits.
    assert all(m.router_logits is None for m in moe_layers(model))
    return {"lm": lm.detach(), "aux": aux.detach(), "z": z.detach(), "logits": [x.detach() for x in logits],
            "stats": stats.reduce(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def _assert_same(a: dict, b: dict) -> None:
    for key in ("lm", "aux", "z"):
        assert torch.equal(a[key], b[key]), key
    assert len(a["logits"]) == len(b["logits"]) and all(map(torch.equal, a["logits"], b["logits"]))
    assert a["stats"] == b["stats"]
    assert a["grads"].keys() == b["grads"].keys()
    for name, g in a["grads"].items():
        assert torch.equal(g, b["grads"][name]), name


def _attention_calls(model) -> list[int]:
    """Per layer, how often its attention ran: 2 in a step means the layer was recomputed."""
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("kind, autocast", [("dense", False), ("moe", False), ("moe", True), ("sliding", False),
                                            ("shared", False)],
                         ids=["dense", "moe", "moe-bf16-autocast", "sliding-window", "shared-expert"])
def test_loss_routing_and_gradients_equal_the_plain_layers(kind, autocast):
    reference = _step(_model(kind), autocast)
    if kind in ("moe", "shared"):
        assert reference["stats"] is not None and len(reference["logits"]) == 3
    for mode, every in MODES:
        model = _model(kind)
        model.set_activation_checkpointing(mode, every)
        calls = _attention_calls(model)
        _assert_same(reference, _step(model, autocast))
        assert calls == [2 if i % every == 0 else 1 for i in range(3)], (mode, every, calls)
    model = _model(kind)
    model.set_activation_checkpointing("full")
    model.set_activation_checkpointing("none")  # back to the plain layer
    calls = _attention_calls(model)
    _assert_same(reference, _step(model, autocast))
    assert calls == [1, 1, 1]


class _Retained(TorchDispatchMode):
    """Every storage an op writes while active; ``alive()``: the bytes of those still referenced."""

    def __init__(self):
        super().__init__()
        self.written: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.written[s._cdata] = (StorageWeakRef(s), s.nbytes())
        return out

    def alive(self, exclude: set[int]) -> int:
        return sum(n for key, (ref, n) in self.written.items() if not ref.expired() and key not in exclude)


def _kept_bytes(mode: str) -> int:
    """Bytes of activations held for the backward after the forward of a 4-layer MoE."""
    model = _model("moe", layers=4, hidden=64)
    model.set_activation_checkpointing(mode)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    ids = torch.randint(0, 48, (4, 65), generator=torch.Generator().manual_seed(1))
    with _Retained() as seen:
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    kept = seen.alive(params)
    loss.backward()
    return kept


def test_checkpointing_keeps_fewer_activations():
    none, selective, full = (_kept_bytes(m) for m in ("none", "selective", "full"))
    # Full keeps a layer's input only; selective the matmul and attention outputs, not the
    # norms', RoPE's, SwiGLU's and the routing's fp32 intermediates.
    assert full < selective < none, (none, selective, full)
    assert full < none / 3 and selective < 0.8 * none, (none, selective, full)


def _grouped_mm_runs_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, 8, dtype=torch.bfloat16),
                          offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm does not run on CPU in this torch")
def test_compiled_layers_checkpoint_inside_their_graph():
    """compile_layers with the checkpoint inside each layer's compiled region. Selective: AOTAutograd
    traces forward and backward and its partitioner applies the policy (aot_eager: no code
    generation, so no C compiler needed); full: dynamo's capture alone (backend eager; AOTAutograd
    would add some seconds). The result equals the eager plain layers (so do the compiled plain
    layers, in bf16 on the CPU), the layers share one graph per mode, and the next step does not
    recompile."""
    from torch._dynamo.utils import counters

    def model():
        return _model("moe", layers=2, dtype=torch.bfloat16, impl="grouped", hidden=16)

    reference = _step(model())
    # every 2: a plain and a checkpointed layer, two graphs
    for mode, every, backend, graphs in (("selective", 1, "aot_eager", 1), ("full", 2, "eager", 2)):
        torch._dynamo.reset()
        counters.clear()
        m = model()
        m.set_activation_checkpointing(mode, every)
        m.compile_layers(backend=backend)
        _assert_same(reference, _step(m))
        assert counters["stats"]["unique_graphs"] == graphs, (mode, counters["stats"])
        m.zero_grad()
        assert torch.equal(_step(m)["lm"], reference["lm"])
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    torch._dynamo.reset()


def test_choice_list_is_the_models_own():
    assert choices(TrainConfig, "activation_checkpointing") == ACTIVATION_CHECKPOINTING


def test_set_activation_checkpointing_refuses_bad_values():
    model = _model("dense", layers=1)
    with pytest.raises(ValueError, match="must be one of"):
        model.set_activation_checkpointing("partial")
    with pytest.raises(ValueError, match="integer >= 1"):
        model.set_activation_checkpointing("full", 0)


# With aux-loss-free balancing on: its per-step loads are counted from the router logits too.
_SHORT = {"steps": 4, "save_interval": 2, "eval_interval": 2, "optim.warmup_steps": 1, "loss.bias_update_rate": 2**-6}
_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "val_loss", "router_load", "router_entropy", "router_bias_max")


def _yaml(tmp, datasets, name: str):
    return _write_yaml(tmp / f"{name}.yaml", _config(tmp, datasets, out_dir=str(tmp / name), **_SHORT))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, datasets):
    """4 steps of moe-tiny on the CPU in fp32 without checkpointing, through the CLI."""
    tmp = tmp_path_factory.mktemp("plain")
    assert cli_main(["train", "--config", str(_yaml(tmp, datasets, "plain"))]) == 0
    return tmp / "plain"


def test_train_and_resume_with_checkpointing_match_the_plain_run(tmp_path, datasets, plain_run):
    """`dropup train` with the keys set: the same losses, gradient norms and routing as without
    them (fp32 on the CPU: bit for bit), and a resume may switch the mode (recorded)."""
    config = _yaml(tmp_path, datasets, "ckpt")
    run = tmp_path / "ckpt"
    assert cli_main(["train", "--config", str(config), "--set", "activation_checkpointing=full",
                     "--set", "activation_checkpointing_every=2"]) == 0
    assert json.loads((run / "ckpt" / "step_4" / "trainer.json").read_text())["config"][
        "activation_checkpointing"] == "full"

    def same_as_plain() -> None:
        plain, got = _metrics(plain_run), _metrics(run)
        assert [r["step"] for r in got] == [r["step"] for r in plain] == [1, 2, 3, 4]
        assert all(r["router_bias_max"] for r in plain)
        for a, b in zip(plain, got):
            for key in _KEYS:
                assert a.get(key) == b.get(key), (a["step"], key)

    same_as_plain()
    shutil.rmtree(run / "ckpt" / "step_4")
    assert cli_main(["train", "--config", str(config), "--resume", "--set", "activation_checkpointing=selective"]) == 0
    same_as_plain()
    changes = _metrics(run)[2]["config_changes"]
    assert changes == {"activation_checkpointing": ["full", "selective"],
                       "activation_checkpointing_every": [2, 1]}


@pytest.mark.slow  # two torchrun processes start (about 15 s on 2 cores); FSDP2 is where recomputation needs the all-gathered weights
def test_two_processes_with_fsdp2_match_the_plain_run(tmp_path, datasets, plain_run):
    """Selective checkpointing inside FSDP2's per-layer units (2 processes over gloo): the
    recomputation in the backward runs on the re-gathered weights, and the run matches the plain
    one-process run as the plain 2-process run does (to float32 reduction order)."""
    config = _yaml(tmp_path, datasets, "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dropup", "train", "--config", str(config), "--set", "activation_checkpointing=selective"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "activation checkpointing (selective) on 2 of 2 decoder layers" in out.stdout
    plain, got = _metrics(plain_run), _metrics(tmp_path / "fsdp")
    assert [r["step"] for r in got] == [r["step"] for r in plain]
    for a, b in zip(plain, got):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("sets, message", [
    (["activation_checkpointing=partial"],
     "config: activation_checkpointing must be one of none, full, selective, not 'partial'"),
    (["activation_checkpointing=true"], "config: activation_checkpointing must be one of none, full, selective"),
    (["activation_checkpointing_every=0"], "activation_checkpointing_every must be >= 1"),
    (["activation_checkpointing_every=2.5"], "activation_checkpointing_every must be an integer"),
])  # fmt: skip
def test_bad_value_is_one_line_exit_2(tmp_path, datasets, capsys, sets, message):
    path = _write_yaml(tmp_path / "c.yaml", _config(tmp_path, datasets))
    assert cli_main(["train", "--config", str(path), *(x for s in sets for x in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dropup train: error: ") and message in err, err
    assert not (tmp_path / "run").exists()
