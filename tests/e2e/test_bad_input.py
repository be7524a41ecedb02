"""Bad input: one line on stderr naming the problem, exit code 2, no traceback, OUT untouched."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_dense
from conftest import cli_fails as _fails

from dropup.cli import main
from dropup.errors import UserError
from dropup.hub import safetensors as checkpoint


class NotATensor:
    """Unpickling an arbitrary class means importing and running code: weights_only refuses it."""


def _nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.dropup-")]


@pytest.fixture
def src(dense_models, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(dense_models["llama"], dst)
    return dst


def test_missing_src(capsys, tmp_path):
    _fails(capsys, ["upcycle", str(tmp_path / "nope"), str(tmp_path / "out")], "does not exist")
    _nothing_left(tmp_path / "out")


def test_missing_config(capsys, src, tmp_path):
    (src / "config.json").unlink()
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")], "no config.json")
    _nothing_left(tmp_path / "out")


def test_unsupported_model_type(capsys, src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")], "'gpt2' is not supported",
           "llama, mistral, qwen2, qwen3")
    _nothing_left(tmp_path / "out")


def _rewrite(src: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(src / "model.safetensors")
    fn(t)
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(capsys, src, tmp_path):
    _rewrite(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")],
           "model.layers.1.mlp.up_proj.weight is missing")
    _nothing_left(tmp_path / "out")


def test_wrong_shape(capsys, src, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)

    _rewrite(src, shrink)
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")],
           "model.layers.0.self_attn.k_proj.weight has shape [8, 32]", "[16, 32]")
    _nothing_left(tmp_path / "out")


def test_unsafe_pytorch_bin_is_refused(capsys, src, tmp_path):
    (src / "model.safetensors").unlink()

    torch.save({"x": NotATensor()}, src / "pytorch_model.bin")
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")], "pytorch_model.bin",
           "weights_only=True", "convert it to safetensors")
    _nothing_left(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_named(capsys, src, tmp_path, damage):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00\xff" * 100)
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")], str(f), "not a valid safetensors")
    _nothing_left(tmp_path / "out")


@pytest.mark.parametrize("flags,needle", [
    (["--ratio", "1.5"], "--ratio must be >= 0 and <= 1, got 1.5"),
    (["--ratio", "-0.1"], "--ratio must be >= 0 and <= 1, got -0.1"),
    (["--top-k", "9"], "--top-k must be >= 1 and <= num_experts (8), got 9"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--num-experts", "1", "--top-k", "1"], "at least 2 experts"),
    (["--max-shard-size", "lots"], "not a size"),
    (["--method", "btx"], "needs --sources"),
    (["--target", "qwen2_moe"], "cannot be built from a llama model"),
])
def test_bad_options(capsys, src, tmp_path, flags, needle):
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out"), *flags], needle)
    _nothing_left(tmp_path / "out")


def test_btx_sources_of_different_shapes(capsys, src, tmp_path):
    other = build_dense(tmp_path / "other", "llama", d_f=96)
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out"), "--method", "btx", "--sources",
                    str(other)], "different shape", "d_f 64 vs 96")
    _nothing_left(tmp_path / "out")


def test_out_not_empty_without_overwrite(capsys, src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _fails(capsys, ["upcycle", str(src), str(out)], "is not empty", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["upcycle", str(src), str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "precious.txt").exists() and (out / "upcycling.json").is_file()


def test_disk_full_mid_write(capsys, src, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = checkpoint.ShardedWriter.write

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(checkpoint.ShardedWriter, "write", write)
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out"), "--quiet"], "filled up")
    _nothing_left(tmp_path / "out")


def test_disk_full_keeps_the_old_output(capsys, src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(["upcycle", str(src), str(out), "--quiet"]) == 0
    before = (out / "model.safetensors").read_bytes()

    def write(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.ShardedWriter, "write", write)
    _fails(capsys, ["upcycle", str(src), str(out), "--overwrite", "--seed", "9"], "filled up")
    assert (out / "model.safetensors").read_bytes() == before


def test_not_enough_free_space_is_caught_before_writing(capsys, src, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")], "only 0.00 GB are free")
    _nothing_left(tmp_path / "out")


def test_real_entry_point_exit_code(src, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "dropup", "upcycle", str(src), str(tmp_path / "out"),
                        "--ratio", "2"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.strip() == "dropup upcycle: error: --ratio must be >= 0 and <= 1, got 2.0 (0.5 is the paper's choice)"
    assert r.stdout == ""


# ---- JSON metadata of the wrong shape: valid JSON, but not what the file should hold ---------------


def _header_file(path: Path, header: bytes) -> None:
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize("text,needles", [
    ("[1, 2]", ["config.json: a JSON array, not an object", "Hugging Face model config"]),
    ('"llama"', ["config.json: a JSON string, not an object"]),
    ("null", ["config.json: a JSON null, not an object"]),
    ("[" * 100000, ["config.json: not valid JSON"]),
])
def test_config_json_of_the_wrong_shape(capsys, src, tmp_path, text, needles):
    (src / "config.json").write_text(text)
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")], *needles)
    _nothing_left(tmp_path / "out")
    _fails(capsys, ["inspect", str(src)], *needles)
    from dropup.model.io import load_config

    with pytest.raises(UserError, match="config.json: "):
        load_config(src)


@pytest.mark.parametrize("index,needle", [
    ([1, 2], "a JSON array, not an object"),
    ({"metadata": {}}, "no 'weight_map', not an object"),
    ({"weight_map": ["model.safetensors"]}, "a JSON array as its 'weight_map', not an object"),
    ({"weight_map": "model.safetensors"}, "a JSON string as its 'weight_map'"),
    ({"weight_map": {"lm_head.weight": 3}}, 'tensor lm_head.weight maps to 3, not a shard file name'),
    ({"weight_map": {"lm_head.weight": "../other/model.safetensors"}}, "not a shard file name"),
])
def test_weight_index_of_the_wrong_shape(capsys, src, tmp_path, index, needle):
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")], "model.safetensors.index.json", needle)
    assert "weight_map" in line  # says what the file should hold
    _nothing_left(tmp_path / "out")


@pytest.mark.parametrize("header,needle", [
    (b"[1, 2]", "the header is a JSON array, not an object"),
    (b'"text"', "the header is a JSON string, not an object"),
    (b'{"w": [1, 2]}', "tensor w is described by a JSON array, not an object"),
    (b'{"w": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 0]}}', "not a valid safetensors"),
    (b"\xff\xfe{}", "not a valid safetensors"),
])
def test_safetensors_header_of_the_wrong_shape(capsys, src, tmp_path, header, needle):
    f = src / "model.safetensors"
    _header_file(f, header)
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out")], str(f), needle, "re-download or re-save")
    _nothing_left(tmp_path / "out")
    _fails(capsys, ["inspect", str(src)], str(f), needle)
