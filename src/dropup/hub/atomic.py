"""Outputs that appear whole or not at all: directories (``atomic_dir``) and single files
(``atomic_write_text``).

Everything dropup writes as a directory (converted checkpoints, exported models, training
checkpoints, datasets, the corpus) is assembled in a hidden temporary directory beside its final
path and moved into place only once complete. On any failure, Ctrl-C included, the temporary is
removed and the final path is left as it was; a process killed outright leaves only a
dot-directory, never something that looks finished, and the next write of the same output
removes it. One process at a time writes an output (``exclusive_lock``); a second one is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Iterable, Iterator
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
    locked = True
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
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                os.close(fd)
                raise
            locked = False
            break
        # The lock file is removed on exit (no litter beside every output), so the file we
        # opened may have been unlinked by its holder between our open and our flock: then we
        # hold a lock on an inode no one else can reach, and must start over with the file now
        # at ``path``. The holder unlinks before it unlocks, so once the inode at ``path`` is the
        # one we locked, every other process that opens ``path`` gets this inode and is refused
        # until we unlink it; whoever opens it after that creates a new one, by which time we are
        # past the block: never two holders at once.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD.add(fd)
    try:
        with contextlib.suppress(OSError):  # the pid is for the refusal message only
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield locked
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _HELD.discard(fd)
        os.close(fd)


# A flock belongs to the open file, which a forked child shares: the tokenizer workers of
# `data prepare`, forked while its output is locked, would hold the lock for as long as they
# live, and they outlive a parent killed with SIGKILL, so every later run would be refused.
# Children close their copies; the parent's descriptor alone keeps the lock.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


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
               stale: str | tuple[str, ...] | None = None,
               protect: Iterable[tuple[str, str | os.PathLike]] = (),
               full_advice: str = "free space") -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success it becomes ``out``.

    ``existing`` says what happens when ``out`` already holds something:

    - ``refuse``: a non-empty ``out`` is an error, ``{label} {out} is not empty; {advice}``,
      raised before anything is written (an empty directory is replaced);
    - ``replace``: the new directory takes the old one's place whole; the old one is removed only
      once the new one is in place;
    - ``merge``: the new files are moved in one by one over their namesakes and the other files
      stay (an exported model beside its tokenizer); a directory replaces its namesake whole.
      Entries of ``out`` matching the glob ``stale`` (or one of several) that the new directory
      lacks are removed (the previous weights' other shards), and the new ones matching it move
      in before the rest (weights before config.json).

    Refused before anything is written, whatever ``existing`` says, each with one ``UserError``
    line: an ``out`` that is not a directory, a symbolic link that points nowhere, the current
    directory or one holding it (unless merging), an ``out`` that is, is inside or holds one of
    the ``protect`` paths (``(what, path)`` pairs, e.g. ``("SRC", src)``; symbolic links
    resolved), a location that cannot be written, and an ``out`` another process is writing:
    one writer per output, through an ``exclusive_lock`` on ``.{name}.dropup-lock`` beside it,
    held until the output is in place. A disk that fills up while writing is one line too,
    ``... filled up while writing; {full_advice} and run again. Nothing was written``.

    The temporary is ``.{out.name}.dropup-tmp-{pid}`` unless ``tmp_name`` names it (callers in
    several processes need a name they all know). Temporaries left beside ``out`` by killed
    writers are removed on entry; a previous ``out`` that a killed ``replace`` had moved aside
    is put back first. Symbolic links in ``out`` are resolved: the output replaces what the
    link points to and the link stays.
    """
    given = Path(out)
    final = _final_path(given, label, existing)
    for what, path in protect:
        _check_apart(given, final, label, what, Path(path))
    if final.exists() and not final.is_dir():
        raise UserError(f"{label} {given} exists and is not a directory; choose another path")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the parent directory of {label}, {parent} ({e.strerror})") from None
    what = f"{label} {given}"
    with exclusive_lock(parent / f".{final.name}.dropup-lock", what) as locked:
        # Everything below runs under the lock, the emptiness check included: a second writer
        # can neither slip its output in between our check and our rename nor remove our
        # temporary as a leftover.
        _remove_leftovers(final, tmp_name, locked)
        if existing == "refuse" and final.is_dir() and any(final.iterdir()):
            raise UserError(f"{label} {given} is not empty; {advice}")
        tmp = parent / (tmp_name or f".{final.name}.dropup-tmp-{os.getpid()}")
        old = parent / f".{final.name}.dropup-old-{os.getpid()}"
        try:
            try:
                tmp.mkdir()
            except OSError as e:
                raise _os_error(e, what, parent) from None
            yield tmp
            if not final.exists():
                tmp.rename(final)
            elif existing == "merge":
                _merge(tmp, final, stale)
            else:
                final.rename(old)
                tmp.rename(final)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"the disk holding {given} filled up while writing; {full_advice} "
                                "and run again. Nothing was written") from None
            raise
        finally:
            if os.path.lexists(old) and not final.exists():
                old.rename(final)  # stopped between the two renames: the previous output is whole
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed


def _final_path(given: Path, label: str, existing: Existing) -> Path:
    if given.is_symlink() and not given.exists():
        raise UserError(f"{label} {given} is a symbolic link to {os.readlink(given)}, which does not "
                        "exist; remove the link or choose another path")
    final = given.resolve()
    try:
        cwd = Path.cwd()
    except FileNotFoundError:  # already deleted: nothing to protect
        return final
    # Renaming the current directory away would leave the shell in a deleted directory (and
    # '.' itself cannot be renamed): refused before the work rather than after it.
    if existing != "merge" and (final == cwd or final in cwd.parents):
        raise UserError(f"{label} {given} {'is' if final == cwd else 'holds'} the current directory, "
                        "which cannot be replaced; name a new directory")
    return final


def _check_apart(given: Path, final: Path, label: str, what: str, path: Path) -> None:
    try:
        src = path.resolve()
    except (OSError, RuntimeError):  # a link loop: not a place anything is written to; its reader says so
        src = Path(os.path.abspath(path))
    if final == src:
        relation = "is"
    elif src in final.parents:
        relation = "is inside"
    elif final in src.parents:
        relation = "holds"
    else:
        return
    raise UserError(f"{label} {given} {relation} {what} {path}; {label} must be apart from {what} "
                    "(neither it, inside it nor holding it): choose another path")


def _remove_leftovers(final: Path, tmp_name: str | None, locked: bool) -> None:
    """Remove what killed writers of ``final`` left beside it (SIGKILL, power loss: no
    ``finally`` ran), as large as the output itself.

    Holding the lock, everything of this output's is a leftover: its writer held the same lock,
    so it is gone, whatever its pid says (a pid may have been reused by an unrelated process, or
    belong to another pid namespace). Without a lock (no ``flock`` on this filesystem) only the
    temporaries of pids that no longer exist are removed.
    """
    parent, mine = final.parent, os.getpid()
    pattern = re.compile(rf"\.{re.escape(final.name)}\.dropup-(tmp|old)-(\d+)")
    found = []
    for p in parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and (locked or int(m[2]) == mine or not _alive(int(m[2]))):
            found.append((m[1], p))
    if tmp_name and os.path.lexists(parent / tmp_name):
        found.append(("tmp", parent / tmp_name))
    # A writer killed between moving the previous output aside and moving the new one in left
    # both whole; the previous one is what the user last saw finished, so it goes back.
    for kind, p in sorted(found, key=lambda kp: kp[0] != "old"):
        if kind == "old" and not os.path.lexists(final):
            p.rename(final)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _merge(tmp: Path, out: Path, stale: str | tuple[str, ...] | None) -> None:
    patterns = (stale,) if isinstance(stale, str) else stale or ()
    new = sorted(p.name for p in tmp.iterdir())
    owned = {p.name for pattern in patterns for p in tmp.glob(pattern)}
    for pattern in patterns:
        for old in out.glob(pattern):
            if old.name not in owned:
                _remove(old)
    for name in sorted(new, key=lambda n: n not in owned):
        if (tmp / name).is_dir() and (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)  # a rename cannot replace a directory that is not empty
        os.replace(tmp / name, out / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file ``path`` by ``text`` in one step: readers see the old or the new file,
    never a part (a hidden temporary beside it is renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.dropup-tmp-{os.getpid()}")
    # A writer killed between writing and renaming left its temporary: remove those of dead pids.
    for old in path.parent.glob(f".{path.name}.dropup-tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
