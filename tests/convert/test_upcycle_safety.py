"""`dropup upcycle` never touches its input, never writes one OUT twice at once, and refuses
options and output locations it cannot honour before any work: one line on stderr, exit code 2."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_fails as _fails

from dropup.cli import main
from dropup.hub import atomic


def _digests(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def src(dense_models, tmp_path) -> Path:
    dst = tmp_path / "models" / "src"
    shutil.copytree(dense_models["llama"], dst)
    return dst


@pytest.mark.parametrize("where", ["SRC itself", "a link to SRC", "SRC's parent", "inside SRC"])
def test_out_never_touches_src(capsys, src, tmp_path, where):
    before = _digests(src.parent)
    (tmp_path / "link").symlink_to(src)
    out, says = {"SRC itself": (src, "is SRC"), "a link to SRC": (tmp_path / "link", "is SRC"),
                 "SRC's parent": (src.parent, "holds SRC"), "inside SRC": (src / "moe", "is inside SRC")}[where]
    for extra in ([], ["--overwrite"]):
        _fails(capsys, ["upcycle", str(src), str(out), "--quiet", *extra], f"OUT {out} {says} {src}",
               "OUT must be apart from SRC")
    assert _digests(src.parent) == before and _hidden(src.parent) == [] and _hidden(src) == []


def test_out_never_touches_a_btx_source(capsys, src, tmp_path):
    other = tmp_path / "models" / "src2"
    shutil.copytree(src, other)
    before = _digests(src.parent)
    _fails(capsys, ["upcycle", str(src), str(other), "--method", "btx", "--sources", str(other),
                    "--num-experts", "2", "--top-k", "1", "--overwrite", "--quiet"],
           f"OUT {other} is btx source {other}")
    assert _digests(src.parent) == before


def test_one_writer_per_out(capsys, src, tmp_path):
    """A second process writing the same OUT is refused at once; the first one's result stands."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from dropup.hub.atomic import atomic_dir\n"
         f"with atomic_dir({str(out)!r}) as tmp:\n"
         "    (tmp / 'first').write_text('1'); print('in', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "in\n"
        for extra in ([], ["--overwrite"]):
            _fails(capsys, ["upcycle", str(src), str(out), "--quiet", *extra],
                   f"OUT {out} is being written by another dropup process (pid {holder.pid}); "
                   "wait for it to finish or choose another path")
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait()
    assert _digests(out) == {"first": hashlib.sha256(b"1").hexdigest()} and _hidden(tmp_path) == []
    assert main(["upcycle", str(src), str(out), "--quiet", "--overwrite"]) == 0  # free again


def test_out_that_is_the_current_directory(capsys, src, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for extra in ([], ["--overwrite"]):
        _fails(capsys, ["upcycle", str(src), ".", "--quiet", *extra],
               "OUT . is the current directory, which cannot be replaced; name a new directory")
        _fails(capsys, ["upcycle", str(src), "..", "--quiet", *extra], "OUT .. holds the current directory")
    assert list(work.iterdir()) == [] and _hidden(tmp_path) == []
    assert main(["upcycle", str(src), "moe", "--quiet"]) == 0  # relative to it is fine
    assert (work / "moe" / "upcycling.json").is_file()


def test_out_that_is_a_dangling_link(capsys, src, tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone" / "away")
    _fails(capsys, ["upcycle", str(src), str(out), "--quiet"],
           f"OUT {out} is a symbolic link to {tmp_path / 'gone' / 'away'}, which does not exist")
    assert out.is_symlink() and not (tmp_path / "gone").exists()


def test_out_through_a_link_to_a_directory(src, tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "disk")
    assert main(["upcycle", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out").is_symlink() and (tmp_path / "disk" / "upcycling.json").is_file()


def test_out_in_an_unwritable_directory(capsys, src, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open, real_mkdir = atomic.os.open, os.mkdir

    def refuse(path):  # a read-only filesystem (chmod stops nothing for root, who runs CI)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def inside(path) -> bool:
        return os.path.dirname(os.path.abspath(path)) == str(ro)

    monkeypatch.setattr(atomic.os, "open", lambda p, *a, **k: refuse(p) if inside(p) else real_open(p, *a, **k))
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: refuse(p) if inside(p) else real_mkdir(p, *a, **k))
    _fails(capsys, ["upcycle", str(src), str(ro / "out"), "--quiet"],
           f"cannot write OUT {ro / 'out'}: {ro} is not writable (Read-only file system)")


def test_out_below_a_file(capsys, src, tmp_path):
    (tmp_path / "file").write_text("")
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "file" / "out"), "--quiet"],
           "cannot create the parent directory of OUT")


@pytest.mark.parametrize("args, says", [
    (["--ratio", "nan"], "--ratio must be a finite number, got nan"),
    (["--ratio", "inf"], "--ratio must be a finite number, got inf"),
    (["--noise-std", "nan"], "--noise-std must be a finite number, got nan"),
    (["--noise-std", "-0.1"], "--noise-std must be >= 0, got -0.1"),
    (["--router-std", "inf"], "--router-std must be a finite number, got inf"),
    (["--init-std", "nan", "--method", "scratch"], "--init-std must be a finite number, got nan"),
    (["--init-std=-inf"], "--init-std must be a finite number, got -inf"),
    (["--aux-loss-coef", "nan"], "--aux-loss-coef must be a finite number, got nan"),
    (["--aux-loss-coef", "-1"], "--aux-loss-coef must be >= 0, got -1.0"),
    (["--seed", "-1"], "--seed must be >= 0 and <= 2^63 - 1, got -1"),
    (["--seed", str(2**63)], f"--seed must be >= 0 and <= 2^63 - 1, got {2**63}"),
    (["--threads", "-2"], "--threads must be >= 0, got -2"),
    (["--num-experts", "0", "--top-k", "1"], "--num-experts must be >= 2, got 0"),
    (["--top-k", "0"], "--top-k must be >= 1 and <= num_experts (8), got 0"),
    (["--max-shard-size", "inf"], "--max-shard-size 'inf' is not a size"),
    (["--max-shard-size", "0"], "--max-shard-size '0' must be positive"),
])
def test_numeric_options_are_finite_and_in_range(capsys, src, tmp_path, args, says):
    _fails(capsys, ["upcycle", str(src), str(tmp_path / "out"), "--quiet", *args], says)
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


def test_numeric_options_from_python(src, tmp_path):
    import numpy as np

    from dropup import UserError, upcycle

    # --ratio takes text ("0.5", "0.2,0.4", "linear:A:B"; tests/convert/test_ratio.py), so text that
    # is none of those stands for a string where a number belongs
    for bad in (dict(ratio="half"), dict(ratio=True), dict(seed=1.5), dict(num_experts=True), dict(router_std=float("nan")),
                dict(max_shard_size=-5)):
        with pytest.raises(UserError):
            upcycle(src, tmp_path / "out", progress=False, **bad)
    prov = upcycle(src, tmp_path / "out", progress=False, seed=np.int64(3), ratio=np.float32(0.25))
    assert prov["options"]["seed"] == 3 and type(prov["options"]["seed"]) is int
