"""dropup upcycle --moe-layers: only some layers become MoE (Qwen-MoE's mlp_only_layers /
decoder_sparse_step), the others keep the dense FFN bit for bit; checked against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_dense, cli_fails, load_tensors

from dropup import upcycle
from dropup.hub.config import ModelConfig
from dropup.model.io import load_model

LAYERS = 5
SEQ = 24


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> dict[str, Path]:
    """Five-layer dense models: enough depth for every:2 and every:3 to differ from a list."""
    root = tmp_path_factory.mktemp("deep")
    return {arch: build_dense(root / arch, arch, layers=LAYERS) for arch in ("qwen2", "qwen3", "llama", "granite")}


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _hf_moe_layers(model) -> list[int]:
    """The layers transformers itself built as MoE blocks (they have experts)."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


# (source, target, SPEC, the MoE layers transformers must build)
CASES = [
    ("qwen3", "qwen3_moe", "every:2", [1, 3]),
    ("qwen3", "qwen3_moe", "every:3", [2]),
    ("qwen3", "qwen3_moe", "0,3,4", [0, 3, 4]),
    ("qwen2", "qwen2_moe", "every:2", [1, 3]),
    ("qwen2", "qwen2_moe", "4,1", [1, 4]),
    ("qwen2", "qwen2_moe", [0, 2], [0, 2]),  # the Python API's list
]


@pytest.mark.parametrize("arch, target, spec, moe", CASES)
def test_naive_mixed_layers_compute_the_dense_function(deep, tmp_path, arch, target, spec, moe):
    src, out = deep[arch], tmp_path / "moe"
    prov = upcycle(src, out, method="naive", num_experts=4, top_k=2, moe_layers=spec, progress=False)
    hf_moe, hf_dense = _hf(out), _hf(src)
    assert hf_moe.config.model_type == target
    assert _hf_moe_layers(hf_moe) == moe  # transformers reads the config as the layers we meant
    assert ModelConfig.from_hf(json.loads((out / "config.json").read_text())).moe_layers == moe
    assert prov["moe_layers"] == moe
    assert [len(layer) for layer in prov["layers"]] == [4 if i in moe else 0 for i in range(LAYERS)]
    ids = _ids()
    with torch.no_grad():
        dense_logits = hf_dense(ids).logits
        assert (hf_moe(ids).logits - dense_logits).abs().max().item() <= 1e-5
        ours = load_model(out)
        assert [i for i, layer in enumerate(ours.model.layers) if layer.is_moe] == moe
        assert (ours(ids) - dense_logits).abs().max().item() <= 1e-5
    # The dense layers hold the source's FFN under the dense names, bit for bit, and no MoE part.
    moe_t, dense_t = load_tensors(out), load_tensors(src)
    for i in range(LAYERS):
        ffn = [f"model.layers.{i}.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
        router = f"model.layers.{i}.mlp.gate.weight"
        if i in moe:
            assert router in moe_t and not any(n in moe_t for n in ffn)
        else:
            assert router not in moe_t and not any(k.startswith(f"model.layers.{i}.mlp.experts.") for k in moe_t)
            for n in ffn:
                assert moe_t[n].dtype == dense_t[n].dtype and torch.equal(moe_t[n], dense_t[n]), n


@pytest.mark.parametrize("arch, spec", [("qwen3", "every:2"), ("qwen2", "0,2,3")])
def test_drop_mixed_layers_transformers_equals_dropup(deep, tmp_path, arch, spec):
    out = tmp_path / "moe"
    upcycle(deep[arch], out, method="drop", ratio=0.5, num_experts=4, top_k=2, moe_layers=spec,
            router_init="normal", router_std=0.5, progress=False)
    ids = _ids(1)
    with torch.no_grad():
        ref = _hf(out)(ids).logits
        ours = load_model(out)(ids)
        dense = _hf(deep[arch])(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ref - dense).abs().max().item() > 1e-3  # drop changed the MoE layers: the check means something


@pytest.mark.parametrize("n", range(1, LAYERS + 1))
def test_every_n_is_decoder_sparse_step(deep, tmp_path, n):
    """every:N is transformers' decoder_sparse_step=N: layers with (i + 1) % N == 0 are MoE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    upcycle(deep["qwen3"], tmp_path / "moe", method="scratch", num_experts=2, top_k=1,
            moe_layers=f"every:{n}", progress=False)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["decoder_sparse_step"] == n and cfg["mlp_only_layers"] == []
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "moe"))
    assert _hf_moe_layers(model) == [i for i in range(LAYERS) if (i + 1) % n == 0]


def test_inspect_reports_the_moe_layers(deep, tmp_path, capsys):
    from dropup.analysis.experts import format_report, inspect_checkpoint

    out = tmp_path / "moe"
    upcycle(deep["qwen3"], out, method="drop", ratio=0.5, num_experts=4, top_k=2, moe_layers="every:2",
            progress=False)
    r = inspect_checkpoint(out, progress=False)
    assert r["moe_layers"] == [1, 3] and [s["layer"] for s in r["similarity"]] == [1, 3]
    hf = _hf(out)
    assert r["total_params"] == sum(p.numel() for p in hf.parameters())
    per_expert = 3 * 32 * 64
    assert r["total_params"] - r["active_params"] == 2 * (4 - 2) * per_expert  # two MoE layers, 2 of 4 idle
    assert "5 layers, MoE in 2 of them: 1, 3" in format_report(r)
    assert r["upcycling"]["intact_fraction_mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("spec, needle", [
    ("5", "layer 5 is out of range; SRC has 5 layers (0 to 4)"),
    ("1,9", "layer 9 is out of range"),
    ("", "names no layer"),
    ("1,,3", "empty entry"),
    ("every:0", "N must be a positive integer"),
    ("every:x", "N must be a positive integer"),
    ("every:6", "makes no layer MoE in a 5-layer model"),
    ("-1", "'-1' is not a layer index"),
    ("1,1", "lists layer 1 twice"),
])  # fmt: skip
def test_bad_specs_are_one_line_and_write_nothing(deep, tmp_path, capsys, spec, needle):
    out = tmp_path / "moe"
    cli_fails(capsys, ["upcycle", str(deep["qwen3"]), str(out), "--moe-layers", spec], "--moe-layers", needle)
    assert not out.exists()


def test_mixtral_and_granitemoe_cannot_keep_layers_dense(deep, tmp_path, capsys):
    out = tmp_path / "moe"
    cli_fails(capsys, ["upcycle", str(deep["llama"]), str(out), "--moe-layers", "every:2"],
              "mixtral cannot keep layers dense", "only --target qwen2_moe and qwen3_moe can")
    assert not out.exists()
    cli_fails(capsys, ["upcycle", str(deep["granite"]), str(out), "--moe-layers", "1"],
              "granitemoe cannot keep layers dense")
    assert not out.exists()
    # The same source can become a qwen3_moe with dense layers.
    upcycle(deep["llama"], out, target="qwen3_moe", moe_layers="every:2", method="naive", progress=False)
    assert _hf_moe_layers(_hf(out)) == [1, 3]
