"""Checkpoint I/O: lazy reading of Hugging Face checkpoints and streaming sharded safetensors writing.

Reading maps one safetensors file per tensor request (``safe_open``) and lets the mapping go as
soon as the tensor is dropped, so resident memory holds only what is being worked on. Writing
knows every output tensor's name, dtype and shape up front (the plan), so each shard's header is
written first and tensors are streamed after it one at a time: no shard is ever held in memory.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dropup.errors import UserError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Tensors some old checkpoints carry that are recomputed by the model and never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class _Sized:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass(frozen=True)
class TensorInfo(_Sized):
    """Where a source tensor lives and what it is."""

    file: Path = Path()


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without mapping the data.

    A truncated download or a file that is not safetensors is caught here, with its name, before
    any tensor is touched (a truncated file read through a memory map would crash the process).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length is larger than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {json_type(header)}, not an object")
        data_len = size - 8 - n
        out: dict[str, TensorInfo] = {}
        end_max = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"tensor {name} is described by a JSON {json_type(entry)}, not an object")
            dtype = ST_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            info = TensorInfo(dtype, tuple(int(d) for d in entry["shape"]), file=path)
            if end - begin != info.nbytes or end > data_len:
                raise ValueError(f"tensor {name} lies outside the file (truncated?)")
            end_max = max(end_max, end)
            out[name] = info
        if end_max != data_len:
            raise ValueError(f"data section is {data_len} bytes but the header describes {end_max}")
        return out
    except (ValueError, KeyError, TypeError, RecursionError, struct.error) as e:
        raise UserError(
            f"{path}: not a valid safetensors file ({e}); re-download or re-save it"
        ) from None


def json_type(value) -> str:
    """JSON's name for the type of a parsed value (a list is an array to whoever wrote the file)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in file ``path``; anything else (not JSON, an array, a string) is a UserError
    that names the file and ``what`` it should have been."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not valid JSON ({e}); expected {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}); expected {what}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: a JSON {json_type(value)}, not an object; expected {what}")
    return value


class CheckpointReader:
    """A Hugging Face checkpoint directory opened for lazy, tensor-by-tensor reading."""

    def __init__(self, path: str | os.PathLike, what: str = "SRC"):
        self.path = Path(path)
        self.what = what
        if not self.path.is_dir():
            raise UserError(f"{what} {self.path} does not exist or is not a directory; "
                            "pass a Hugging Face checkpoint directory")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{what} {self.path} has no config.json; pass a Hugging Face "
                            "checkpoint directory (save it with save_pretrained)")
        self.config: dict = read_json_object(cfg_path, "a Hugging Face model config")
        self.tensors: dict[str, TensorInfo] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self._index_weights()

    def _index_weights(self) -> None:
        p = self.path
        if (p / "model.safetensors.index.json").is_file():
            files = sorted(set(self._read_index(p / "model.safetensors.index.json").values()))
            for fname in files:
                f = p / fname
                if not f.is_file():
                    raise UserError(f"{self.what}: shard {f} named by the index is missing")
                self.tensors.update(read_safetensors_header(f))
        elif (p / "model.safetensors").is_file():
            self.tensors.update(read_safetensors_header(p / "model.safetensors"))
        elif (p / "pytorch_model.bin").is_file() or (p / "pytorch_model.bin.index.json").is_file():
            self._load_bin()
        else:
            raise UserError(f"{self.what} {p} holds no model.safetensors, sharded safetensors "
                            "or pytorch_model.bin weights")
        for name in [n for n in self.tensors if n.endswith(IGNORED_SUFFIXES)]:
            del self.tensors[name]

    def _read_index(self, path: Path) -> dict[str, str]:
        what = 'a weight index ({"weight_map": {tensor name: shard file name}})'
        weight_map = read_json_object(path, what).get("weight_map")
        if not isinstance(weight_map, dict):
            problem = "no" if weight_map is None else f"a JSON {json_type(weight_map)} as its"
            raise UserError(f"{path}: {problem} 'weight_map', not an object; expected {what}")
        for name, fname in weight_map.items():
            # A shard is a file beside the index: a path elsewhere is not one save_pretrained writes.
            if not isinstance(fname, str) or not fname or Path(fname).name != fname:
                raise UserError(f"{path}: tensor {name} maps to {json.dumps(fname)}, not a shard file "
                                f"name; expected {what}")
        return weight_map

    def _load_bin(self) -> None:
        """Legacy pickled weights, read only with ``weights_only=True`` (no code execution)."""
        p = self.path
        if (p / "pytorch_model.bin.index.json").is_file():
            files = sorted(set(self._read_index(p / "pytorch_model.bin.index.json").values()))
        else:
            files = ["pytorch_model.bin"]
        self._bin = {}
        for fname in files:
            f = p / fname
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means "refuse"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(
                    f"{f}: cannot be read safely with torch.load(weights_only=True) ({first[:160]}); "
                    "convert it to safetensors"
                ) from None
            for name, t in sd.items():
                self._bin[name] = t
                self.tensors[name] = TensorInfo(t.dtype, tuple(t.shape), file=f)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if self._bin is not None:
            return self._bin[name]
        # A fresh mapping per tensor: it is released with the tensor, keeping memory bounded.
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (dim 0), reading only their bytes from a
        safetensors file: what one process of a sharded model needs of it."""
        info = self.tensors[name]
        if self._bin is not None:
            return self._bin[name][start:stop]
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def copy_side_files(self, dst: Path) -> list[str]:
        copied = []
        for fname in TOKENIZER_FILES:
            f = self.path / fname
            if f.is_file():
                shutil.copyfile(f, dst / fname)
                copied.append(fname)
        return copied


# ---------------------------------------------------------------------------------------------
# Writing

# Direct I/O needs file offsets, lengths and memory addresses on this boundary; a page also keeps
# buffered and direct writes from ever sharing a page-cache page.
try:
    ALIGN = max(4096, os.sysconf("SC_PAGE_SIZE"))
except (AttributeError, ValueError, OSError):
    ALIGN = 4096
DIRECT_CHUNK = 8 << 20  # per direct write, as dd bs=8M (no measurable difference from 64 MiB here)


@dataclass(frozen=True)
class TensorSpec(_Sized):
    """One tensor of an output plan."""

    name: str = ""


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB', or a plain number of bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            num = s[: -len(unit)].strip()
            break
    else:
        num, mult = s, 1
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise UserError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB or 500MB") from None
    if value <= 0:
        raise UserError(f"--max-shard-size {text!r} must be positive")
    return value


def split_shards(plan: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of the plan, each at most max_bytes (a single larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in plan:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str], align: int = 8) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_ST[spec.dtype], "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Trailing spaces are valid JSON; they put the data section on an ``align`` boundary
    # (8 for the format, a page for direct I/O).
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw


class _OutFile:
    """One output file written front to back, bulk data through ``O_DIRECT`` where possible.

    Buffered writes of a multi-gigabyte checkpoint spend as much CPU copying into the page cache as
    the conversion spends computing (measured: 35% of all CPU time of 1.5B -> 8x1.5B on 2 cores).
    Direct writes hand the tensor's own pages to the device. Only whole aligned blocks go direct;
    a tensor's unaligned head and tail (and tensors whose memory is not aligned like their file
    offset) go through a second, buffered descriptor, so every block is written by one path only.
    Filesystems without direct I/O (tmpfs, some network filesystems) get buffered writes.
    """

    def __init__(self, path: Path, direct: bool):
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.dfd = os.open(path, flags | os.O_DIRECT)
            except OSError:
                self.dfd = None
        self.pos = 0

    def write(self, data: memoryview, address: int | None = None) -> None:
        """Append ``data``; ``address`` is where it lives in memory (None: buffered only)."""
        n, pos = len(data), self.pos
        if (self.dfd is not None and address is not None and n >= 2 * ALIGN
                and (address - pos) % ALIGN == 0):
            head = -pos % ALIGN
            body = (n - head) // ALIGN * ALIGN
            _pwrite_all(self.fd, data[:head], pos)
            try:
                for k in range(0, body, DIRECT_CHUNK):
                    piece = min(DIRECT_CHUNK, body - k)
                    _pwrite_all(self.dfd, data[head + k:head + k + piece], pos + head + k)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.dfd)  # refused after all (e.g. a larger device block): buffered
                self.dfd = None
                _pwrite_all(self.fd, data[head:head + body], pos + head)
            _pwrite_all(self.fd, data[head + body:], pos + head + body)
        else:
            _pwrite_all(self.fd, data, pos)
        self.pos += n

    def close(self) -> None:
        for fd in (self.dfd, self.fd):
            if fd is not None:
                os.close(fd)
        self.dfd = self.fd = None


def _view_at(raw: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, phase: int) -> torch.Tensor:
    """A ``shape``/``dtype`` view of the uint8 tensor ``raw`` (``ALIGN`` bytes larger than
    needed) whose address is ``phase`` modulo ``ALIGN``."""
    nbytes = math.prod(shape) * dtype.itemsize
    start = (phase - raw.data_ptr()) % ALIGN
    return raw[start:start + nbytes].view(dtype).view(shape)


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, pos)
        data, pos = data[done:], pos + done


class _BufferPool:
    """Memory of written output tensors, kept for the next tensor of the same size.

    Gigabytes of expert weights stream through a handful of buffers; allocating each one fresh
    costs a page fault per 4 KiB and fragments the allocator (more system time and RSS than the
    arithmetic itself). Each buffer is ``ALIGN`` bytes larger than its tensor, so that a view of
    it can start at any address phase.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # buffers are taken by producer threads
        self._free: dict[int, list[torch.Tensor]] = {}
        self._raw: dict[int, torch.Tensor] = {}  # data_ptr of a handed-out view -> its storage

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, phase: int) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            free = self._free.get(nbytes)
            raw = free.pop() if free else torch.empty(nbytes + ALIGN, dtype=torch.uint8)
            view = _view_at(raw, shape, dtype, phase)
            self._raw[view.data_ptr()] = raw
            return view

    def give(self, t: torch.Tensor) -> None:
        """Take ``t`` back if this pool handed it out; other tensors are left alone."""
        with self._lock:
            raw = self._raw.pop(t.data_ptr(), None)
            if raw is not None:
                self._free.setdefault(raw.numel() - ALIGN, []).append(raw)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._raw.clear()


class ShardedWriter:
    """Writes the tensors of a fixed plan, in plan order, into safetensors shards.

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors``
    with ``model.safetensors.index.json``, the names ``save_pretrained`` uses.

    Headers are padded to a page, so each tensor's file offset modulo ``ALIGN`` is known from the
    plan. A tensor whose memory has that same phase goes to disk with direct I/O; the writer hands
    out memory placed that way (``buffer``, ``placed``, ``stage``), so callers never deal with
    offsets. Buffers from ``buffer`` are pooled: ``write`` takes them back for reuse.

    As a context manager it closes on success (checking that every planned tensor was written)
    and on failure only closes its file.
    """

    def __init__(self, out_dir: Path, plan: list[TensorSpec], max_shard_bytes: int,
                 direct: bool = True):
        self.out_dir = out_dir
        self.direct = direct
        self.shards = split_shards(plan, max_shard_bytes)
        n = len(self.shards)
        self.files = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._queue: Iterator[tuple[int, TensorSpec]] = iter(
            (i, s) for i, shard in enumerate(self.shards) for s in shard)
        self._shard = -1
        self._fh: _OutFile | None = None
        self._pool = _BufferPool()
        self.total_bytes = sum(s.nbytes for s in plan)
        self._specs: dict[str, TensorSpec] = {}
        self._phase: dict[str, int] = {}
        for shard in self.shards:
            offset = 0
            for spec in shard:
                self._specs[spec.name] = spec
                self._phase[spec.name] = offset % ALIGN
                offset += spec.nbytes

    def buffer(self, name: str) -> torch.Tensor:
        """Uninitialised memory for planned tensor ``name``, placed so that it goes to disk direct.

        Pooled: ``write`` takes it back, so it must not be used once written.
        """
        spec = self._specs[name]
        return self._pool.take(spec.shape, spec.dtype, self._phase[name])

    def placed(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` ready to be written as ``name``: ``t`` itself when it can go to disk as it is,
        else a pooled copy in the planned dtype (a memcpy costs less than a buffered write)."""
        if self._goes_direct(name, t) or (not self.direct and t.dtype == self._specs[name].dtype):
            return t
        return self.buffer(name).copy_(t)

    def stage(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` kept in memory from which it can be written many times (as ``name`` and the
        tensors placed like it) without the copy ``placed`` would make each time: a copy of
        ``t`` placed for ``name``, not pooled. ``t`` itself when that gains nothing: it is placed
        already, or its dtype is not the planned one (each write converts it anyway)."""
        spec = self._specs[name]
        if not self.direct or t.dtype != spec.dtype or self._goes_direct(name, t):
            return t
        raw = torch.empty(t.numel() * t.element_size() + ALIGN, dtype=torch.uint8)
        return _view_at(raw, tuple(t.shape), t.dtype, self._phase[name]).copy_(t)

    def _goes_direct(self, name: str, t: torch.Tensor) -> bool:
        return (t.dtype == self._specs[name].dtype and t.is_contiguous()
                and (t.data_ptr() - self._phase[name]) % ALIGN == 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, spec = next(self._queue)
        if spec.name != name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"writer got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                               f"plan says {spec}")
        if shard != self._shard:
            self._open(shard)
        data = tensor.contiguous()
        self._fh.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()), data.data_ptr())
        self._pool.give(tensor)

    def _open(self, shard: int) -> None:
        self._close_file()
        self._shard = shard
        self._fh = _OutFile(self.out_dir / self.files[shard], self.direct)
        header = _header_bytes(self.shards[shard], {"format": "pt"}, ALIGN)
        self._fh.write(memoryview(header))

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        leftover = next(self._queue, None)
        if leftover is not None:
            raise RuntimeError(f"writer closed before {leftover[1].name} was written")
        self._close_file()
        self._pool.clear()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {s.name: self.files[i] for i, shard in enumerate(self.shards)
                               for s in shard},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        self._close_file()
        self._pool.clear()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def check_free_space(out: Path, needed: int) -> None:
    parent = Path(out).resolve().parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise UserError(f"OUT needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are "
                        f"free on {parent}; free space or choose another path")


# ---------------------------------------------------------------------------------------------
# dropup's router-bias file

# Per-layer selection biases (aux-loss-free balancing) that no Mixtral / Qwen-MoE config.json can
# express, beside a checkpoint's weights (tensor names: names.router_bias_name). In a
# sub-directory: loaders that read every top-level *.safetensors file of a checkpoint without an
# index as its weights (vLLM does) must not take the biases for weights.
ROUTER_BIAS_FILE = "dropup/router_bias.safetensors"
_ROUTER_BIAS_FORMAT = "dropup-router-bias"


def write_router_bias_file(out: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """``out / ROUTER_BIAS_FILE`` holding ``tensors`` (one float32 [E] bias per MoE layer)."""
    from safetensors.torch import save_file

    path = Path(out) / ROUTER_BIAS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": _ROUTER_BIAS_FORMAT, "version": "1",
                        "use": "added to the softmax router probabilities for the top-k choice only; the "
                               "combine weights are the unbiased probabilities (dropup.model.decoder.select_experts)"})
    return path


def read_router_bias_file(ckpt: str | os.PathLike, names: list[str], num_experts: int) -> dict[str, torch.Tensor] | None:
    """The biases in checkpoint ``ckpt``'s ``ROUTER_BIAS_FILE`` (None when it has none), which
    must be exactly ``names``, each float32 [num_experts]."""
    file = Path(ckpt) / ROUTER_BIAS_FILE
    if not file.is_file():
        return None
    found = read_safetensors_header(file)  # a damaged file is one line
    bad = sorted(set(names) ^ set(found)) or [n for n in names if found[n].shape != (num_experts,)
                                              or found[n].dtype != torch.float32]
    if bad:
        raise UserError(f"{file} does not match {Path(ckpt) / 'config.json'} (tensor {bad[0]}): it must hold "
                        f"one float32 [{num_experts}] selection bias per MoE layer; re-save the model or remove "
                        "the file (the routing then has no bias)")
    from safetensors.torch import load_file

    return load_file(str(file))
