"""Outputs that appear whole or not at all: directories (``atomic_dir``) and single files
(``atomic_write_text``).

Everything dropup writes as a directory (converted checkpoints, exported models, training
checkpoints, datasets, the corpus) is assembled in a hidden temporary directory beside its final
path and moved into place only once complete. On any failure, Ctrl-C included, the temporary is
removed and the final path is left as it was; a process killed outright leaves only a
dot-directory, never something that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from dropup.errors import UserError

Existing = Literal["refuse", "replace", "merge"]


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the file ``path`` (created, and removed on exit) while the
    block runs; if another process holds it, raise ``UserError`` at once:
    ``{what} is being written by another dropup process (pid N); wait for it to finish or
    choose another path``.

    Yields True, or False on a filesystem without ``flock`` (some network filesystems), where
    the block runs unlocked rather than not at all. The lock is advisory: it keeps dropup
    processes apart, on one machine or on filesystems whose ``flock`` spans machines.
    """
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _os_error(e, what, path.parent) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise UserError(f"{what} is being written by another dropup process"
                            f"{f' (pid {holder})' if holder else ''}; wait for it to finish or "
                            "choose another path") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
            yield False
            return
        # The lock file is removed on exit (no litter beside every output), so the file we
        # opened may have been unlinked by its holder between our open and our flock: then we
        # hold a lock on an inode no one else can reach, and must start over with the file now
        # at ``path``. The holder unlinks before it unlocks, so once the inode at ``path`` is the
        # one we locked, every other process either waits on this inode or opens a newer one and
        # finds it taken: never two holders.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    # Informative only: the holder writes its pid just after locking, so this may be empty.
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _os_error(e: OSError, what: str, where: Path) -> Exception:
    """A ``UserError`` for the ways a write location can be unusable; other errors as they are."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {what}: {where} is not writable ({e.strerror}); "
                         "choose another path or fix its permissions")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"cannot write {what}: the disk holding {where} is full; free space or "
                         "choose another path")
    return e


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, existing: Existing = "refuse", label: str = "OUT",
               advice: str = "choose another path", tmp_name: str | None = None,
               stale: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success it becomes ``out``.

    ``existing`` says what happens when ``out`` already holds something:

    - ``refuse``: a non-empty ``out`` is an error, ``{label} {out} is not empty; {advice}``,
      raised before anything is written (an empty directory is replaced);
    - ``replace``: the new directory takes the old one's place whole; the old one is removed only
      once the new one is in place;
    - ``merge``: the new files are moved in one by one over their namesakes and the other files
      stay (an exported model beside its tokenizer). Files of ``out`` matching the glob ``stale``
      that the new directory lacks are removed (the previous weights' other shards), and the new
      files matching it move in before the rest (weights before config.json).

    The temporary is ``.{out.name}.dropup-tmp-{pid}`` unless ``tmp_name`` names it (callers in
    several processes need a name they all know). An ``out`` that is not a directory is refused
    whatever ``existing`` says.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{label} {out} exists and is not a directory; choose another path")
    if existing == "refuse" and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{label} {out} is not empty; {advice}")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the parent directory of {label}, {parent} ({e.strerror})") from None
    tmp = parent / (tmp_name or f".{out.name}.dropup-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process of the same pid
    tmp.mkdir()
    try:
        yield tmp
        if not out.exists():
            tmp.rename(out)
        elif existing == "merge":
            _merge(tmp, out, stale)
        else:
            old = parent / f".{out.name}.dropup-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed


def _merge(tmp: Path, out: Path, stale: str | None) -> None:
    new = sorted(p.name for p in tmp.iterdir())
    owned = {p.name for p in tmp.glob(stale)} if stale else set()
    if stale:
        for old in out.glob(stale):
            if old.name not in owned:
                old.unlink()
    for name in sorted(new, key=lambda n: n not in owned):
        os.replace(tmp / name, out / name)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file ``path`` by ``text`` in one step: readers see the old or the new file,
    never a part (a hidden temporary beside it is renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.dropup-tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
