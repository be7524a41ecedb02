"""Fault injection: `dropup upcycle` and `dropup data prepare` killed (SIGKILL: nothing of the
process runs again) or stopped (SIGTERM: what schedulers send) while they write.

Whatever the moment, a previous OUT stays as it was, the next run leaves no temporary behind
and writes exactly what an uninterrupted run writes. The kills are timed by what the process
has written so far (its temporary directory appears, it holds some shards, ...), so they land
at the same stage every time; each test checks that the kill did land before the output was
complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import build_dense

from dropup.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
SHARDS = "2MB"  # about 100 shards: the writing is long enough to be hit in the middle


def _digests(out: Path) -> dict[str, str]:
    """SHA-256 of every file below ``out``; upcycling.json without its run time and without
    --overwrite (which the uninterrupted reference run had no need for)."""
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "upcycling.json":
                prov = json.loads(data)
                prov["seconds"] = 0
                prov["options"]["overwrite"] = None
                data = json.dumps(prov).encode()
            found[str(p.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return found


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.dropup-"))


def _interrupt(argv: list[str], out: Path, ready: Callable[[Path], bool], sig: int) -> int:
    """Run ``dropup argv``; once its temporary directory satisfies ``ready``, send ``sig``.
    Returns the pid (it names the temporary) after the process has ended."""
    proc = subprocess.Popen([sys.executable, "-m", "dropup", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    tmp = out.parent / f".{out.name}.dropup-tmp-{proc.pid}"
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if tmp.is_dir() and ready(tmp):
                    break
            except FileNotFoundError:  # renamed or removed while we looked
                pass
            time.sleep(0.002)
        else:
            pytest.fail(f"dropup {argv[0]} ended before the kill point (rc {proc.returncode}): "
                        f"{proc.stderr.read().decode()[-2000:]}")
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)  # the whole group: data prepare's tokenizer workers too
        else:
            os.kill(proc.pid, sig)
        rc = proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
        proc.wait()
        proc.stderr.close()
    assert rc != 0, "the kill came too late: the run had finished"
    if sig == signal.SIGKILL:  # nothing cleaned up after it: the temporary shows how far it got
        assert tmp.is_dir() and ready(tmp)
    elif rc == 128 + signal.SIGTERM:  # the CLI turned SIGTERM into Ctrl-C: its cleanup ran
        assert _leftovers(out) == []
    return proc.pid


# ---------------------------------------------------------------------------------- upcycle


@pytest.fixture(scope="module")
def conversion(tmp_path_factory):
    """A dense model whose conversion takes about a second; the output of an uninterrupted run,
    and a previous OUT (another seed) for the interrupted runs to replace."""
    root = tmp_path_factory.mktemp("faults")
    src = build_dense(root / "dense", "llama", hidden=256, d_f=1024, layers=4, vocab=256)
    argv = ["upcycle", str(src), None, "--max-shard-size", SHARDS, "--threads", "1", "--quiet"]
    runs = {}
    for name, seed in (("reference", "0"), ("previous", "1")):
        argv[2] = str(root / name)
        assert main([*argv, "--seed", seed]) == 0
        runs[name] = root / name
    return argv, runs


def _shards(tmp: Path) -> int:
    return sum(1 for p in tmp.iterdir() if p.name.endswith(".safetensors"))


UPCYCLE_POINTS = {
    "started": lambda tmp: True,  # the temporary exists; the first shard may not
    "mid-write": lambda tmp: _shards(tmp) >= 40,
    "last-shards": lambda tmp: _shards(tmp) >= 95,
}


def _cases(points: dict, fast: set[tuple[str, str]]) -> list:
    """Every (point, signal); those not in ``fast`` are marked slow (the module stays near 20 s
    on two cores without them)."""
    return [pytest.param(point, sig, id=f"{point}-{sig.name}",
                         marks=() if (point, sig.name) in fast else pytest.mark.slow)
            for point in points for sig in (signal.SIGKILL, signal.SIGTERM)]


@pytest.mark.parametrize("point, sig", _cases(UPCYCLE_POINTS, {("mid-write", "SIGKILL"),
                                                              ("mid-write", "SIGTERM")}))
def test_upcycle_interrupted(tmp_path, conversion, point, sig):
    argv, runs = conversion
    out = tmp_path / "out"
    shutil.copytree(runs["previous"], out)
    before = _digests(out)
    argv = [argv[0], argv[1], str(out), *argv[3:], "--overwrite"]
    _interrupt(argv, out, UPCYCLE_POINTS[point], sig)
    assert _digests(out) == before  # the previous OUT, whole
    assert main(argv) == 0
    assert _leftovers(out) == []
    assert _digests(out) == _digests(runs["reference"])


def test_upcycle_killed_then_run_without_overwrite(tmp_path, conversion):
    """A first conversion killed leaves no OUT at all, so the next run needs no --overwrite."""
    argv, runs = conversion
    out = tmp_path / "out"
    argv = [argv[0], argv[1], str(out), *argv[3:]]
    _interrupt(argv, out, UPCYCLE_POINTS["mid-write"], signal.SIGKILL)
    assert not out.exists() and _leftovers(out) != []
    assert main(argv) == 0
    assert _leftovers(out) == [] and _digests(out) == _digests(runs["reference"])


# ----------------------------------------------------------------------------- data prepare


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 MB of JSON lines (about a second of tokenising), a tokenizer, and the uninterrupted
    output."""
    root = tmp_path_factory.mktemp("faults-data")
    rnd, words = random.Random(0), [f"w{i}" for i in range(3000)]
    lines = [json.dumps({"text": " ".join(rnd.choice(words) for _ in range(rnd.randint(20, 400)))})
             for _ in range(3400)]
    (root / "small.jsonl").write_text("\n".join(lines[:400]) + "\n")
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "prepare", str(root / "small.jsonl"), "--out", str(root / "tok"),
                 "--tokenizer", "train", "--vocab-size", "1000", "--quiet"]) == 0
    argv = ["data", "prepare", str(root / "docs.jsonl"), "--out", None,
            "--tokenizer", str(root / "tok" / "tokenizer"), "--quiet"]
    argv[4] = str(root / "reference")
    assert main(argv) == 0
    return argv, root / "reference"


PREPARE_POINTS = {
    "started": lambda tmp: True,
    "mid-write": lambda tmp: (tmp / "train.bin").is_file() and (tmp / "train.bin").stat().st_size >= 2 << 20,
}


@pytest.mark.parametrize("point, sig", _cases(PREPARE_POINTS, {("mid-write", "SIGKILL")}))
def test_prepare_interrupted(tmp_path, dataset, point, sig):
    argv, reference = dataset
    out = tmp_path / "ds"
    argv = [*argv[:4], str(out), *argv[5:]]
    _interrupt(argv, out, PREPARE_POINTS[point], sig)
    assert not out.exists()  # never a dataset that looks finished
    assert main(argv) == 0
    assert _leftovers(out) == []
    assert _digests(out) == _digests(reference)


def test_prepare_on_a_full_disk(capsys, tmp_path, dataset, monkeypatch):
    """A disk that fills up is one line for every output, not only the converter's."""
    import errno

    from dropup.data import tokens

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokens.TokenWriter, "add_batch", full)
    argv, _ = dataset
    out = tmp_path / "ds"
    assert main([*argv[:4], str(out), *argv[5:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"the disk holding {out} filled up while writing; free space and run again. "
                        "Nothing was written") and len(err.splitlines()) == 1, err
    assert not out.exists() and _leftovers(out) == []
