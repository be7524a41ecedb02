"""atomic_dir: the output appears whole or not at all, and nothing is left beside it."""

from __future__ import annotations

import os

import pytest

from dropup.errors import UserError
from dropup.hub import atomic
from dropup.hub.atomic import atomic_dir


def _hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _fill(path, files: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)


def _files(path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_appears_when_complete(tmp_path):
    out = tmp_path / "a" / "b" / "out"  # parents created
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name == f".out.dropup-tmp-{os.getpid()}"
        (tmp / "x").write_text("1")
        assert not out.exists()
    assert _files(out) == {"x": "1"} and _hidden(out.parent) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", ["refuse", "replace", "merge"])
def test_failure_leaves_out_as_it_was(tmp_path, error, existing):
    for out, before in ((tmp_path / "new", None), (tmp_path / "old", {"x": "old"})):
        if before is not None and existing == "refuse":
            continue
        if before is not None:
            _fill(out, before)
        with pytest.raises(error):
            with atomic_dir(out, existing=existing) as tmp:
                (tmp / "x").write_text("new")
                raise error()
        assert (_files(out) if out.exists() else None) == before
    assert _hidden(tmp_path) == []


def test_refuse(tmp_path):
    out = tmp_path / "out"
    _fill(out, {"keep": "me"})
    with pytest.raises(UserError, match=f"^output directory {out} is not empty; remove it$"):
        with atomic_dir(out, label="output directory", advice="remove it"):
            pytest.fail("entered")
    (tmp_path / "file").write_text("")
    for existing in ("refuse", "replace", "merge"):
        with pytest.raises(UserError, match="exists and is not a directory"):
            with atomic_dir(tmp_path / "file", existing=existing):
                pytest.fail("entered")
    assert _files(out) == {"keep": "me"} and _hidden(tmp_path) == []
    (tmp_path / "empty").mkdir()  # an empty directory is no reason to refuse
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "x").write_text("1")
    assert _files(tmp_path / "empty") == {"x": "1"}


def test_replace_swaps_the_whole_directory(tmp_path):
    out = tmp_path / "out"
    _fill(out, {"a": "old", "b": "old"})
    with atomic_dir(out, existing="replace", tmp_name=".out.custom") as tmp:
        assert tmp.name == ".out.custom"
        (tmp / "a").write_text("new")
        assert _files(out) == {"a": "old", "b": "old"}
    assert _files(out) == {"a": "new"} and _hidden(tmp_path) == []


def test_merge_replaces_files_and_keeps_the_others(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fill(out, {"model.safetensors": "old", "config.json": "old", "tokenizer.json": "tok"})
    moved = []
    real = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real(a, b)))
    with atomic_dir(out, existing="merge", stale="model*.safetensors*") as tmp:
        _fill(tmp, {"config.json": "new", "model-00001-of-00002.safetensors": "new",
                    "model-00002-of-00002.safetensors": "new", "model.safetensors.index.json": "new"})
    assert _files(out) == {"config.json": "new", "model-00001-of-00002.safetensors": "new",
                           "model-00002-of-00002.safetensors": "new",
                           "model.safetensors.index.json": "new", "tokenizer.json": "tok"}
    assert moved[-1] == "config.json"  # the weights first
    assert _hidden(tmp_path) == []


def test_exclusive_lock_refuses_a_second_holder(tmp_path):
    lock = tmp_path / ".x.dropup-lock"
    with atomic.exclusive_lock(lock, "thing x") as held:
        assert held and lock.read_text() == f"{os.getpid()}\n"
        # flock belongs to an open file, so a second open in this process is a second holder
        with pytest.raises(UserError, match=rf"^thing x is being written by another dropup process "
                                            rf"\(pid {os.getpid()}\); wait for it to finish or "
                                            r"choose another path$"):
            with atomic.exclusive_lock(lock, "thing x"):
                pytest.fail("entered")
    assert not lock.exists()
    with atomic.exclusive_lock(lock, "thing x"):  # free again
        pass


def test_exclusive_lock_survives_a_holder_that_was_killed(tmp_path):
    lock = tmp_path / ".x.dropup-lock"
    lock.write_text("999999999\n")  # left by a killed holder: the kernel dropped its lock
    with atomic.exclusive_lock(lock, "thing x") as held:
        assert held
    assert not lock.exists()


def test_exclusive_lock_retries_when_the_holder_removed_the_file(tmp_path, monkeypatch):
    lock = tmp_path / ".x.dropup-lock"
    real_flock, calls = atomic.fcntl.flock, []

    def flock(fd, op):
        if not calls:  # the holder finishes between our open and our flock: a new file appears
            lock.unlink()
            lock.write_text("")
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(atomic.fcntl, "flock", flock)
    with atomic.exclusive_lock(lock, "thing x"):
        assert len(calls) == 2
        assert os.path.samestat(os.stat(lock), os.fstat(calls[1]))
