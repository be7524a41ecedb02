"""Documents out of the files users bring: text, JSON lines, JSON arrays, Parquet and the Arrow
files of Hugging Face ``datasets.save_to_disk``; gzip- or zstd-compressed where it makes sense.

Every reader streams: a JSONL or Parquet file of any size is read a line or a record batch at a
time, and a JSON array element by element. Only a single document (a whole ``.txt`` file in the
default ``file`` mode) is ever held in memory whole.

Bytes that are not UTF-8 are replaced by U+FFFD and counted (or, with ``strict_utf8``, stop the
run with the file name). A JSON line that does not parse or lacks the text field stops the run
with ``file:line``, or is skipped and counted with ``skip_bad``.
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dropup.errors import UserError
from dropup.hub.digest import sha256_file

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
DOC_SPLITS = ("file", "paragraph", "line")


@dataclass
class ReadOptions:
    text_key: str = "text"
    doc_split: str = "file"  # .txt/.md: one document per file, per blank-line paragraph, or per line
    skip_bad: bool = False  # skip (and count) bad JSON lines / records instead of failing
    strict_utf8: bool = False  # fail on bytes that are not UTF-8 instead of replacing them


@dataclass
class InputFile:
    path: Path
    kind: str  # text | jsonl | json | parquet | arrow
    compression: str | None = None  # gzip | zstd
    # Filled while reading:
    sha256: str | None = None
    bytes: int = 0
    docs: int = 0
    tokens: int = 0
    skipped_bad: int = 0
    empty: int = 0
    replaced_utf8: int = 0
    dataset_dir: str | None = None  # the save_to_disk directory an .arrow file belongs to

    def manifest(self) -> dict:
        entry = {"path": str(self.path), "format": self.kind, "compression": self.compression,
                 "bytes": self.bytes, "sha256": self.sha256, "docs": self.docs, "tokens": self.tokens,
                 "skipped_bad": self.skipped_bad, "empty_skipped": self.empty,
                 "replaced_utf8": self.replaced_utf8}
        if self.dataset_dir:
            entry["dataset_dir"] = self.dataset_dir
        return entry


# ---- finding the files --------------------------------------------------------------------------


def classify(path: Path) -> tuple[str, str | None] | None:
    """(kind, compression) from the file name, or None for a file type we do not read."""
    name = path.name.lower()
    compression = None
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(".json"):
        return "json", compression
    if compression is None and name.endswith(".parquet"):
        return "parquet", None
    if compression is None and name.endswith(".arrow"):
        return "arrow", None
    return None


def _hf_dataset_files(d: Path) -> list[Path] | None:
    """The Arrow files of a ``datasets.save_to_disk`` directory (a Dataset or a DatasetDict), in
    the order the library reads them, or None if ``d`` is not one."""
    if (d / "dataset_dict.json").is_file():
        index = d / "dataset_dict.json"
        try:
            splits = json.loads(index.read_text())["splits"]
        except (ValueError, KeyError, TypeError, OSError):
            splits = None
        if not isinstance(splits, list) or not all(isinstance(s, str) and s for s in splits):
            raise UserError(f"{index} is not a datasets.save_to_disk index (a JSON object whose "
                            "'splits' lists the split directories)")
        files = []
        for split in splits:
            # A listed split that is not there would otherwise vanish from the dataset unnoticed.
            part = _hf_dataset_files(d / split) if (d / split).is_dir() else None
            if part is None:
                raise UserError(f"{index} lists split {split!r}, but {d / split} is not a "
                                "datasets.save_to_disk directory; re-save the dataset")
            files += part
        return files
    if (d / "state.json").is_file():
        try:
            entries = json.loads((d / "state.json").read_text())["_data_files"]
            names = [e["filename"] for e in entries]
        except (ValueError, KeyError, TypeError, OSError):
            names = None
        if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise UserError(f"{d / 'state.json'} is not a datasets.save_to_disk state file (its "
                            "'_data_files' should list the Arrow file names)")
        return [d / n for n in names]
    return None


def _file_id(path: Path) -> tuple:
    """What makes two paths the same file (device and inode, which links and hard links share)."""
    try:
        st = path.stat()
    except OSError:
        return ("unreadable", str(path))  # its reader names the problem
    return (st.st_dev, st.st_ino)


def _walk_error(e: OSError) -> None:
    raise UserError(f"cannot list directory {e.filename} ({e.strerror}); fix its permissions or "
                    "leave it out of the inputs")


def _check_link(f: Path) -> None:
    if f.is_symlink() and not f.exists():
        raise UserError(f"input {f} is a broken symbolic link (to {os.readlink(f)}, which does not "
                        "exist or is a loop of links); fix or remove it")


def discover(inputs: list[str], globs: list[str] = (), duplicates: list[str] | None = None) -> list[InputFile]:
    """The input files in reading order: as given, directories expanded in sorted order.

    In a directory, hidden entries are skipped and ``globs`` (fnmatch patterns on the path
    relative to the directory, or on the file name) select files; without globs every file of a
    known type is taken. A directory written by ``datasets.save_to_disk`` is read as one dataset.

    Symbolic links are followed, except a link to a directory that holds it (a loop); a file
    reached more than once (through links, by overlapping inputs) is read once, where it is first
    reached, and the paths skipped are appended to ``duplicates``. A broken link of a known type
    and a directory that cannot be listed are errors, not silently missing data.
    """
    found: list[InputFile] = []
    seen: set[tuple] = set()

    def add(inp: InputFile) -> None:
        key = _file_id(inp.path)
        if key in seen:
            if duplicates is not None:
                duplicates.append(str(inp.path))
            return
        seen.add(key)
        found.append(inp)

    for given in inputs:
        p = Path(given)
        _check_link(p)
        if not p.exists():
            raise UserError(f"input {p} does not exist")
        if p.is_dir():
            hf = _hf_dataset_files(p)
            if hf is not None:
                for f in hf:
                    add(InputFile(f, "arrow", dataset_dir=str(p)))
                continue
            # A link to a directory that holds it is a loop: not entered. Anything else reached
            # twice is walked twice, its files read once by ``add``.
            above = {str(p): frozenset([_file_id(p)])}
            for root, dirs, files in os.walk(p, onerror=_walk_error, followlinks=True):
                rootp = Path(root)
                keep = []
                for d in sorted(d for d in dirs if not d.startswith(".")):
                    key = _file_id(rootp / d)
                    if key not in above[root]:
                        above[os.path.join(root, d)] = above[root] | {key}
                        keep.append(d)
                dirs[:] = keep
                del above[root]
                if rootp != p and _hf_dataset_files(rootp) is not None:
                    for f in _hf_dataset_files(rootp):
                        add(InputFile(f, "arrow", dataset_dir=str(rootp)))
                    dirs[:] = []
                    continue
                for name in sorted(files):
                    f = rootp / name
                    rel = f.relative_to(p).as_posix()
                    if name.startswith(".") or (globs and not any(
                            fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in globs)):
                        continue
                    kind = classify(f)
                    if kind is not None and (kind[0] != "arrow" or globs):
                        _check_link(f)
                        add(InputFile(f, *kind))
        else:
            kind = classify(p)
            if kind is None:
                raise UserError(f"input {p}: unknown file type; expected .txt/.md, .jsonl/.json "
                                "(optionally .gz/.zst), .parquet, .arrow or a directory")
            add(InputFile(p, *kind))
    if not found:
        raise UserError(f"no input files found in {', '.join(inputs)}"
                        + (f" matching {', '.join(globs)}" if globs else ""))
    return found


# ---- bytes in: hashing, decompression, UTF-8 ----------------------------------------------------


class _HashingRaw(io.RawIOBase):
    """A raw file that hashes every byte read through it (the manifest's input hash, in the
    same pass that reads the data)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.h.update(memoryview(b)[:n])
        self.n += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


_bad_utf8 = [0]


def _replace_and_count(e: UnicodeDecodeError):
    _bad_utf8[0] += 1
    return "\ufffd", e.end


codecs.register_error("dropup-replace-count", _replace_and_count)


def _zstd_reader(f):
    try:
        import zstandard
    except ImportError:
        raise UserError("reading .zst files needs the zstandard package (pip install zstandard)") from None
    return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)


class _Decoder:
    def __init__(self, inp: InputFile, opts: ReadOptions):
        self.inp, self.errors = inp, "strict" if opts.strict_utf8 else "dropup-replace-count"

    def __call__(self, raw: bytes, where: str) -> str:
        before = _bad_utf8[0]
        try:
            text = raw.decode("utf-8", self.errors)
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: bytes that are not UTF-8 (at byte {e.start}); drop "
                            "--strict-utf8 to replace them with U+FFFD") from None
        self.inp.replaced_utf8 += _bad_utf8[0] - before
        return text


def _open_stream(inp: InputFile):
    """A buffered binary stream of the (decompressed) contents, hashing the raw bytes."""
    try:
        f = open(inp.path, "rb")
    except OSError as e:
        raise UserError(f"input {inp.path} cannot be read ({e.strerror}); fix its permissions or "
                        "leave it out") from None
    raw = _HashingRaw(f)
    buffered = io.BufferedReader(raw, 1 << 20)
    if inp.compression == "gzip":
        stream = gzip.GzipFile(fileobj=buffered, mode="rb")
    elif inp.compression == "zstd":
        stream = io.BufferedReader(_zstd_reader(buffered), 1 << 20)
    else:
        stream = buffered
    return raw, stream


def _corrupt(inp: InputFile, e: Exception) -> UserError:
    what = f"{inp.compression} data" if inp.compression else "file"
    return UserError(f"{inp.path}: corrupt or truncated {what} ({type(e).__name__}: {e})")


# ---- documents out ------------------------------------------------------------------------------


def read_documents(inp: InputFile, opts: ReadOptions) -> Iterator[str]:
    """Every non-empty document of one input file, in file order; fills in ``inp``'s counts."""
    if inp.kind in ("parquet", "arrow"):
        yield from _read_columnar(inp, opts)
        return
    raw, stream = _open_stream(inp)
    try:
        reader = {"text": _read_text, "jsonl": _read_jsonl, "json": _read_json}[inp.kind]
        for text in reader(inp, stream, opts):
            if text.strip():
                inp.docs += 1
                yield text
            else:
                inp.empty += 1
        # Drain what a reader did not need (a gzip trailer) so the hash covers the whole file.
        while raw.read(1 << 20):
            pass
    except (OSError, EOFError) as e:
        raise _corrupt(inp, e) from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise _corrupt(inp, e) from None
        raise
    finally:
        stream.close()
    inp.sha256, inp.bytes = raw.h.hexdigest(), raw.n


def _read_text(inp: InputFile, stream, opts: ReadOptions) -> Iterator[str]:
    decode = _Decoder(inp, opts)
    if opts.doc_split == "file":
        yield decode(stream.read(), str(inp.path))
        return
    # Decode line by line (a UTF-8 sequence never spans a newline byte), keeping memory to one
    # paragraph or line.
    para: list[str] = []
    for lineno, line in enumerate(stream, 1):
        text = decode(line, f"{inp.path}:{lineno}")
        if opts.doc_split == "line":
            yield text.rstrip("\r\n")
        elif text.strip():
            para.append(text)
        elif para:
            yield "".join(para).rstrip("\r\n")
            para = []
    if para:
        yield "".join(para).rstrip("\r\n")


def _text_of(obj, key: str, where: str, inp: InputFile, opts: ReadOptions) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get(key), str):
        return obj[key]
    if not isinstance(obj, dict):
        problem = f"a JSON {type(obj).__name__}, not an object"
    elif key not in obj:
        keys = ", ".join(list(obj)[:8]) or "none"
        problem = f"no {key!r} field (its keys: {keys}); choose the field with --text-key"
    else:
        problem = f"field {key!r} is {type(obj[key]).__name__}, not a string"
    if opts.skip_bad:
        inp.skipped_bad += 1
        return None
    raise UserError(f"{where}: {problem} (or pass --skip-bad to skip such records)")


def _read_jsonl(inp: InputFile, stream, opts: ReadOptions) -> Iterator[str]:
    decode = _Decoder(inp, opts)
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        where = f"{inp.path}:{lineno}"
        try:
            obj = json.loads(decode(line, where))
        except json.JSONDecodeError as e:
            if opts.skip_bad:
                inp.skipped_bad += 1
                continue
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix the line "
                            "or pass --skip-bad to skip such lines") from None
        text = _text_of(obj, opts.text_key, where, inp, opts)
        if text is not None:
            yield text


def _read_json(inp: InputFile, stream, opts: ReadOptions) -> Iterator[str]:
    """A ``.json`` file holding an array of objects (parsed element by element), or JSON lines."""
    first = stream.peek(64)[:64].lstrip()
    if not first.startswith(b"["):
        yield from _read_jsonl(inp, stream, opts)
        return
    text = io.TextIOWrapper(stream, encoding="utf-8",
                            errors="strict" if opts.strict_utf8 else "dropup-replace-count")
    before = _bad_utf8[0]
    decoder, buf, pos, eof, index = json.JSONDecoder(), "", 0, False, 0
    chunk = 1 << 20

    def more() -> bool:
        nonlocal buf, pos, eof
        try:
            data = text.read(chunk)
        except UnicodeDecodeError as e:
            raise UserError(f"{inp.path}: bytes that are not UTF-8 (at byte {e.start} of a chunk); "
                            "drop --strict-utf8 to replace them with U+FFFD") from None
        buf, pos = buf[pos:] + data, 0
        eof = not data
        return bool(data)

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return

    def fail(msg: str):
        raise UserError(f"{inp.path}: element {index}: {msg}")

    try:
        more()
        skip_ws()
        pos += 1  # the opening bracket
        while True:
            skip_ws()
            if pos >= len(buf):
                fail("the array is not closed (truncated file?)")
            if buf[pos] == "]":
                break
            if index > 0:
                if buf[pos] != ",":
                    fail(f"expected ',' or ']' but found {buf[pos]!r}")
                pos += 1
                skip_ws()
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    # A number or literal cut at the buffer's end would parse short: read on first.
                    if end == len(buf) and not eof:
                        raise json.JSONDecodeError("at buffer end", buf, end)
                    break
                except json.JSONDecodeError as e:
                    if eof:
                        fail(f"not valid JSON ({e.msg})")
                    chunk *= 2  # an element longer than the buffer: read more, in growing steps
                    more()
            pos = end
            t = _text_of(obj, opts.text_key, f"{inp.path}: element {index}", inp, opts)
            index += 1
            if t is not None:
                yield t
    finally:
        text.detach()  # closing the wrapper would close the file before it is hashed
    inp.replaced_utf8 += _bad_utf8[0] - before


def _read_columnar(inp: InputFile, opts: ReadOptions) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{inp.path}: reading Parquet and Arrow files needs pyarrow "
                        "(pip install 'dropup[data]' or pip install pyarrow)") from None
    what = "Parquet" if inp.kind == "parquet" else "Arrow (datasets.save_to_disk)"
    try:
        if inp.kind == "parquet":
            pf = pq.ParquetFile(inp.path)
            names = pf.schema_arrow.names
            batches = lambda: pf.iter_batches(batch_size=1024, columns=[opts.text_key])  # noqa: E731
        else:
            reader = pa.ipc.open_stream(pa.memory_map(str(inp.path)))
            names = reader.schema.names
            batches = lambda: (b.select([opts.text_key]) for b in reader)  # noqa: E731
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{inp.path}: not a readable {what} file ({e})") from None
    if opts.text_key not in names:
        raise UserError(f"{inp.path}: no column {opts.text_key!r} (columns: {', '.join(names)}); "
                        "choose one with --text-key")
    try:
        row = 0
        for batch in batches():
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    if not opts.skip_bad:
                        raise UserError(f"{inp.path}: row {row}: column {opts.text_key!r} is "
                                        f"{type(value).__name__}, not a string (or pass --skip-bad)")
                    inp.skipped_bad += 1
                elif value.strip():
                    inp.docs += 1
                    yield value
                else:
                    inp.empty += 1
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{inp.path}: not a readable {what} file ({e})") from None
    inp.bytes = inp.path.stat().st_size
    inp.sha256 = sha256_file(inp.path)


@dataclass
class Totals:
    files: int = 0
    docs: int = 0
    skipped_bad: int = 0
    empty: int = 0
    replaced_utf8: int = 0
    per_file: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, files: list[InputFile]) -> Totals:
        return cls(len(files), sum(f.docs for f in files), sum(f.skipped_bad for f in files),
                   sum(f.empty for f in files), sum(f.replaced_utf8 for f in files),
                   [f.manifest() for f in files])
