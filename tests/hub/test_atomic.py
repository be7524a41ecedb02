"""atomic_dir: the output appears whole or not at all, and nothing is left beside it."""

from __future__ import annotations

import errno
import os
import re

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


@pytest.mark.parametrize("where", ["is", "is inside", "holds"])
def test_protected_paths_are_refused_before_anything_is_written(tmp_path, where):
    src = tmp_path / "a" / "src"
    _fill(src, {"weights": "dense"})
    (tmp_path / "link").symlink_to(tmp_path / "a")  # through a link: the same directory
    out = {"is": tmp_path / "link" / "src", "is inside": src / "moe", "holds": tmp_path / "link"}[where]
    for existing in ("refuse", "replace", "merge"):
        with pytest.raises(UserError, match=rf"^OUT {out} {where} SRC {src}; OUT must be apart from SRC"):
            with atomic_dir(out, existing=existing, protect=[("SRC", src)]):
                pytest.fail("entered")
    assert _files(src) == {"weights": "dense"}
    assert [p.name for p in src.parent.iterdir()] == ["src"] and _hidden(tmp_path) == []
    with atomic_dir(tmp_path / "a" / "other", protect=[("SRC", src)]) as tmp:  # a sibling is fine
        (tmp / "x").write_text("1")


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "out"
    for existing in ("refuse", "replace", "merge"):
        with atomic_dir(out, existing="replace") as tmp:
            (tmp / "x").write_text("first")
            with pytest.raises(UserError, match=rf"^OUT {out} is being written by another dropup "
                                                rf"process \(pid {os.getpid()}\); wait for it"):
                with atomic_dir(out, existing=existing):
                    pytest.fail("entered")
            assert tmp.is_dir()  # the refused writer removed nothing of ours
        assert _files(out) == {"x": "first"} and _hidden(tmp_path) == []


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    out = tmp_path / "out"
    _fill(out, {"x": "done"})
    dead = _dead_pid()
    for name in (f".out.dropup-tmp-{dead}", f".out.dropup-old-{dead}",
                 f".out.dropup-tmp-{os.getppid()}"):  # a live pid: reused, or a writer that held no lock
        _fill(tmp_path / name, {"big": "x" * 1000})
    (tmp_path / ".out.dropup-lock").write_text(f"{dead}\n")  # a killed holder's lock file
    _fill(tmp_path / ".other.dropup-tmp-1", {"keep": "me"})  # another output's: not ours to judge
    with atomic_dir(out, existing="replace") as tmp:
        assert _hidden(tmp_path) == sorted([".other.dropup-tmp-1", ".out.dropup-lock", tmp.name])
        (tmp / "x").write_text("new")
    assert _files(out) == {"x": "new"} and _hidden(tmp_path) == [".other.dropup-tmp-1"]


def test_without_flock_only_dead_writers_leftovers_go(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic.fcntl, "flock", no_flock)
    live = f".out.dropup-tmp-{os.getppid()}"
    _fill(tmp_path / live, {"x": "theirs"})
    _fill(tmp_path / f".out.dropup-tmp-{_dead_pid()}", {"x": "left"})
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert _hidden(tmp_path) == [live] and _files(tmp_path / "out") == {"x": "1"}


def test_a_replace_killed_between_its_renames_gets_the_previous_output_back(tmp_path):
    dead = _dead_pid()
    _fill(tmp_path / f".out.dropup-old-{dead}", {"x": "previous"})  # moved aside, then killed
    _fill(tmp_path / f".out.dropup-tmp-{dead}", {"x": "new"})
    with pytest.raises(UserError, match="is not empty"):  # it is back, so refuse refuses it
        with atomic_dir(tmp_path / "out"):
            pytest.fail("entered")
    assert _files(tmp_path / "out") == {"x": "previous"} and _hidden(tmp_path) == []


def test_interrupted_between_the_renames_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fill(out, {"x": "previous"})
    real, calls = atomic.Path.rename, []

    def rename(self, target):
        calls.append(self.name)
        if len(calls) == 2:  # out moved aside; SIGTERM (KeyboardInterrupt) lands here
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(atomic.Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, existing="replace") as tmp:
            (tmp / "x").write_text("new")
    assert _files(out) == {"x": "previous"} and _hidden(tmp_path) == []


def test_current_directory_and_dangling_links(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out, existing, what in ((".", "refuse", "is"), (".", "replace", "is"), ("..", "replace", "holds")):
        with pytest.raises(UserError, match=rf"^OUT {out} {what} the current directory, which cannot "
                                            "be replaced; name a new directory$"):
            with atomic_dir(out, existing=existing):
                pytest.fail("entered")
    with atomic_dir(".", existing="merge") as tmp:  # merging into it replaces no directory
        assert tmp == tmp_path / f".work.dropup-tmp-{os.getpid()}"
        (tmp / "x").write_text("1")
    assert _files(work) == {"x": "1"}
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match=rf"^OUT {tmp_path / 'dangling'} is a symbolic link to "
                                        rf"{tmp_path / 'nowhere'}, which does not exist; remove"):
        with atomic_dir(tmp_path / "dangling"):
            pytest.fail("entered")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with atomic_dir(tmp_path / "link", existing="replace") as tmp:  # a link to a directory: its target
        (tmp / "y").write_text("2")
    assert (tmp_path / "link").is_symlink() and _files(tmp_path / "target") == {"y": "2"}
    assert _hidden(tmp_path) == []


def _unwritable(monkeypatch, where, err):
    """Make directory ``where`` refuse new entries like a read-only or full filesystem (the
    tests run as root too, where chmod stops nothing)."""
    real_open, real_mkdir = atomic.os.open, os.mkdir

    def inside(path) -> bool:
        return os.path.dirname(os.path.abspath(path)) == str(where)

    def fail(path):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(atomic.os, "open", lambda p, *a, **k: fail(p) if inside(p) else real_open(p, *a, **k))
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: fail(p) if inside(p) else real_mkdir(p, *a, **k))


@pytest.mark.parametrize("err, says", [(errno.EROFS, "is not writable (Read-only file system)"),
                                       (errno.EACCES, "is not writable (Permission denied)"),
                                       (errno.ENOSPC, "is full; free space")])
def test_an_unwritable_location_is_one_line(tmp_path, monkeypatch, err, says):
    ro = tmp_path / "ro"
    ro.mkdir()
    _unwritable(monkeypatch, ro, err)
    with pytest.raises(UserError, match=rf"^cannot write OUT {ro / 'out'}: .*{re.escape(says)}"):
        with atomic_dir(ro / "out"):
            pytest.fail("entered")
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_parent_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match="is not writable"):
            with atomic_dir(ro / "out"):
                pytest.fail("entered")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("existing", ["refuse", "replace", "merge"])
def test_a_full_disk_while_writing_is_one_line(tmp_path, existing):
    out = tmp_path / "out"
    if existing != "refuse":
        _fill(out, {"x": "old"})
    with pytest.raises(UserError, match=rf"^the disk holding {out} filled up while writing; free "
                                        r"space \(see X\) and run again. Nothing was written$"):
        with atomic_dir(out, existing=existing, full_advice="free space (see X)") as tmp:
            (tmp / "x").write_text("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (_files(out) if out.exists() else None) == (None if existing == "refuse" else {"x": "old"})
    assert _hidden(tmp_path) == []


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """Worker processes forked while an output is locked (data prepare's tokenizers) outlive a
    parent killed with SIGKILL; they must not keep later runs out."""
    import signal
    import subprocess
    import sys

    lock = tmp_path / ".x.dropup-lock"
    script = f"""
import os, signal, sys, time
from dropup.hub.atomic import exclusive_lock
with exclusive_lock({str(lock)!r}, "thing x"):
    child = os.fork()
    if child == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # let the test's pipe close
        os.dup2(devnull, 2)
        time.sleep(60)  # an orphaned worker
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: the lock file stays
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    orphan = int(p.stdout)
    try:
        assert lock.exists()
        os.kill(orphan, 0)  # still alive
        with atomic.exclusive_lock(lock, "thing x") as held:
            assert held
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_atomic_write_text_replaces_whole_and_removes_a_dead_writers_temporary(tmp_path):
    import subprocess
    import sys

    from dropup.hub.atomic import atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    (tmp_path / f".metrics.jsonl.dropup-tmp-{dead}").write_text("half")  # a killed writer's
    (tmp_path / f".metrics.jsonl.dropup-tmp-{os.getppid()}").write_text("live")  # a live one's
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["metrics.jsonl", f".metrics.jsonl.dropup-tmp-{os.getppid()}"])
