"""GGUF files as dense sources: dequantised into a temporary Hugging Face checkpoint directory.

Many small public models are distributed only as GGUF (llama.cpp's format). transformers reads a
GGUF (``from_pretrained(dir, gguf_file=name)``, dequantising to float) but cannot save one back,
and the rest of dropup reads checkpoint directories lazily, tensor by tensor. ``dense_source``
bridges the two: a GGUF file is dequantised, one tensor at a time, into a hidden directory
beside the output, which every reader then takes as any dense checkpoint, and which is removed
when the block ends (on an error or Ctrl-C too; a process killed outright leaves it, and the
next run beside the same output removes it).

What transformers decides, it decides here as well: the config it parses from the GGUF metadata,
the GGUF-to-Hugging-Face tensor names, llama's reversed q/k row permutation, the tokenizer it
builds from the GGUF vocabulary. dropup writes the result itself: config.json through
``ModelConfig``, the weights through ``ShardedWriter``, so the checkpoint is what dropup would
write and the tensors are exactly transformers' dequantised values. The ``gguf`` package is an
optional extra (``pip install 'dropup[gguf]'``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from dropup.errors import UserError
from dropup.hub.atomic import _alive
from dropup.hub.card import generation_config
from dropup.hub.config import DENSE_TYPES, GRANITE_TYPES, ModelConfig, config_json
from dropup.hub.digest import sha256_file
from dropup.hub.names import dense_shape
from dropup.hub.safetensors import DTYPE_NAMES, ShardedWriter, TensorSpec

MAGIC = b"GGUF"
GGUF_TYPES = tuple(t for t in DENSE_TYPES if t not in GRANITE_TYPES)  # transformers reads no Granite GGUF
INSTALL = "reading GGUF needs the gguf package: pip install 'dropup[gguf]'"
_TMP = re.compile(r"\..+\.dropup-gguf-(\d+)-[^/]+")
# GGUF tensors stored as plain floats keep their width; quantised ones dequantise to float32,
# which holds every value they can express exactly.
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_HELD: dict[Path, dict] = {}  # dequantised directory -> its GGUF's record, while a block holds it


def is_gguf(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a file meant as GGUF: named ``*.gguf`` or starting with its magic."""
    if path is None:
        return False
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def origin(checkpoint: str | os.PathLike) -> dict:
    """What provenance says of a source read from ``checkpoint``: for the dequantised copy of a
    GGUF held now, the GGUF's path and its record (``{"path": ..., "gguf": {...}}``); else ``{}``."""
    record = _HELD.get(Path(checkpoint))
    return {"path": record["path"], "gguf": record} if record else {}


def dequantised(path: str | os.PathLike | None) -> Path | None:
    """The directory holding the dequantised copy of the GGUF file ``path`` while a
    ``dense_source`` block of this process holds one (a training export takes its tokenizer
    from it); None otherwise."""
    if not is_gguf(path):
        return None
    want = str(Path(path).resolve())
    return next((d for d, rec in _HELD.items() if rec["path"] == want), None)


@contextlib.contextmanager
def dense_source(path: str | os.PathLike, *, beside: str | os.PathLike, what: str = "SRC",
                 log: Callable[[str], None] | None = None, progress: bool = False) -> Iterator[Path]:
    """Yield a checkpoint directory for the dense source ``path``: ``path`` itself unless it is a
    GGUF file, which is dequantised into a hidden directory beside ``beside`` (the output being
    written, so that the copy lands on the disk that has room for the output) and removed when the
    block ends. The directory is named as the GGUF file, so that a model card naming its source
    names the GGUF. ``log`` gets one line before the work; ``progress``: a bar on a terminal."""
    if not is_gguf(path):
        yield Path(path)
        return
    src = Path(path)
    parent = Path(beside).resolve().parent
    while not parent.is_dir():  # not created here: the output's writer creates what it needs
        parent = parent.parent
    name = Path(beside).resolve().name
    _remove_leftovers(parent, name)
    try:
        root = Path(tempfile.mkdtemp(prefix=f".{name}.dropup-gguf-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise UserError(f"cannot dequantise {what} {src}: {parent} is not writable ({e.strerror}); "
                        "choose another output path") from None
    try:
        local = root / src.name
        local.mkdir()
        record = dequantise(src, local, what=what, log=log, progress=progress)
        _HELD[local] = record
        try:
            yield local
        finally:
            _HELD.pop(local, None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _remove_leftovers(parent: Path, name: str) -> None:
    """Dequantised copies left beside ``name`` by processes killed outright (no ``finally`` ran)."""
    for p in parent.glob(f".{_glob_escape(name)}.dropup-gguf-*"):
        m = _TMP.fullmatch(p.name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            shutil.rmtree(p, ignore_errors=True)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise UserError(INSTALL) from None
    return gguf


def _reader(path: Path, what: str):
    gguf = _gguf_module()
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise UserError(f"{what} {path} is not a GGUF file (it does not start with the GGUF magic "
                        "bytes); pass a GGUF file or a Hugging Face checkpoint directory")
    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        for t in reader.tensors:  # the reader maps what is there; a short last tensor can pass it
            if getattr(t, "data_offset", 0) + getattr(t, "n_bytes", 0) > size:
                raise ValueError(f"tensor {t.name} lies past the end of the file")
    except Exception as e:  # noqa: BLE001 - the reader raises many types for a damaged file
        raise UserError(f"{what} {path}: not a readable GGUF file ({_first_line(e)}); it may be "
                        "truncated: re-download it") from None
    return reader


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _file_type(reader) -> str:
    """The file's quantisation as llama.cpp names it (Q4_1, Q8_0, F16, ...)."""
    gguf = _gguf_module()
    ft = _field(reader, "general.file_type")
    with contextlib.suppress(ValueError, TypeError):
        return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_")
    types = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return types.most_common(1)[0][0] if types else "F32"


def dequantise(path: str | os.PathLike, out: str | os.PathLike, *, what: str = "SRC",
               log: Callable[[str], None] | None = None, progress: bool = False) -> dict:
    """Write the GGUF file ``path`` as a dense Hugging Face checkpoint into the empty directory
    ``out``: config.json, model.safetensors, the tokenizer and generation_config.json. Returns
    the GGUF's record for provenance (path, file name, SHA-256, quantisation, tensor types)."""
    path = Path(path)
    reader = _reader(path, what)
    arch = _field(reader, "general.architecture")
    file_type = _file_type(reader)
    where = f"{what} {path}"
    try:
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, get_gguf_hf_weights_map,
                                                               load_gguf_checkpoint)
    except ImportError as e:
        raise UserError(f"{where}: this transformers cannot read GGUF files ({_first_line(e)}); "
                        "install transformers >= 4.56") from None
    try:
        with _quiet_transformers():
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:  # "GGUF model with architecture X is not supported yet."
        raise UserError(f"{where}: transformers cannot read this GGUF ({_first_line(e)}); "
                        f"dropup reads GGUF files of {', '.join(GGUF_TYPES)} models") from None
    except Exception as e:  # noqa: BLE001 - metadata of an unexpected shape
        raise UserError(f"{where}: transformers could not read its metadata ({_first_line(e)})") from None
    hf = {k: v for k, v in parsed["config"].items() if not k.startswith("_")}  # _model_name_or_path
    model_type = hf.get("model_type")
    if model_type not in GGUF_TYPES:
        raise UserError(f"{where}: a GGUF of a {model_type or arch} model; dropup reads GGUF files of "
                        f"dense {', '.join(GGUF_TYPES)} models")
    if (_field(reader, f"{arch}.expert_count") or 0) > 0:
        raise UserError(f"{where}: a mixture-of-experts GGUF; dropup upcycles dense models")
    shape = dense_shape(hf, where)
    wanted = shape.all_tensors()
    if log is not None:  # once the file is known to be readable: an error stays one line
        log(f"dequantising {path.name} ({file_type}, {len(reader.tensors)} tensors) into a temporary "
            "checkpoint beside the output ...")

    processor = TENSOR_PROCESSORS.get(arch, _base_processor())(config=parsed["config"])
    tensor_map = get_gguf_hf_weights_map(_meta_model(hf), processor)
    plan, seen = [], set()
    for t in reader.tensors:
        hf_name = tensor_map.get(t.name)
        if hf_name not in wanted or hf_name in seen:
            continue  # e.g. llama3's rope_freqs: derived from config.json, as transformers does
        seen.add(hf_name)
        plan.append((t, TensorSpec(_FLOAT_TYPES.get(t.tensor_type.name, torch.float32), wanted[hf_name],
                                   name=hf_name)))
    missing = [n for n in wanted if n not in seen]
    if missing:
        raise UserError(f"{where}: the GGUF has no tensor for {missing[0]} ({len(missing)} of "
                        f"{len(wanted)} missing); it does not match its own metadata")
    _check_space(out, sum(spec.nbytes for _, spec in plan), where)

    embed_dtype = next(spec.dtype for _, spec in plan if spec.name == "model.embed_tokens.weight")
    dtype_name = {v: k for k, v in DTYPE_NAMES.items()}[embed_dtype]
    config = ModelConfig.from_hf(hf, where).to_hf(dtype=dtype_name, transformers_version=version("transformers"))
    out = Path(out)
    _write_tensors(reader, plan, processor, tensor_map, out, where, progress)
    (out / "config.json").write_text(config_json(config))
    _save_tokenizer(path, out, where)
    gen = generation_config(config, out if (out / "tokenizer_config.json").is_file() else None)
    (out / "generation_config.json").write_text(config_json(gen))
    types = collections.Counter(t.tensor_type.name for t, _ in plan)
    return {"path": str(path.resolve()), "file": path.name, "sha256": sha256_file(path),
            "architecture": arch, "file_type": file_type, "tensor_types": dict(sorted(types.items())),
            "dequantised_by": f"transformers {version('transformers')}, gguf {version('gguf')}"}


def _base_processor():
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor

    return TensorProcessor


def _meta_model(hf: dict):
    """The transformers model of ``hf`` without memory (meta tensors): only its parameter names
    serve, to map GGUF tensor names onto Hugging Face ones as transformers' loader does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))


def _check_space(out: Path, needed: int, where: str) -> None:
    free = shutil.disk_usage(out).free
    if needed + (64 << 20) > free:
        raise UserError(f"{where}: its dequantised copy needs about {needed / 1e9:.2f} GB beside the "
                        f"output but only {free / 1e9:.2f} GB are free on {out.parent}; free space or "
                        "write the output elsewhere")


def _write_tensors(reader, plan, processor, tensor_map, out: Path, where: str, progress: bool) -> None:
    from gguf import dequantize
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]dequantise"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not (progress and sys.stderr.isatty()), transient=True)
    with bar, ShardedWriter(out, [spec for _, spec in plan], 5 * 10**9) as writer:
        task = bar.add_task("dequantise", total=len(plan))
        for t, spec in plan:
            # One tensor at a time, through transformers' per-architecture processing (llama's
            # q/k rows are permuted back), so memory holds a single dequantised tensor.
            result = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                       tensor_key_mapping=tensor_map, parsed_parameters={"tensors": {}})
            weights = np.require(result.weights, requirements=["C", "W"])  # the mapped file is read-only
            if tuple(weights.shape) != spec.shape:
                raise UserError(f"{where}: tensor {t.name} has shape {list(weights.shape)}, its metadata "
                                f"implies {list(spec.shape)} for {spec.name}")
            writer.write(spec.name, torch.from_numpy(weights).to(spec.dtype))
            bar.advance(task)


def _save_tokenizer(path: Path, out: Path, where: str) -> None:
    """The tokenizer transformers builds from the GGUF's vocabulary, saved with save_pretrained.
    A GGUF without one still converts (a warning says so): the weights do not need it."""
    from transformers import AutoTokenizer

    # transformers reads the GGUF from a directory: one holding nothing else, so that no stray
    # tokenizer_config.json beside the user's file is taken for the GGUF's own.
    alone = out.parent / "gguf"
    alone.mkdir()
    (alone / path.name).symlink_to(path.resolve())
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(alone, gguf_file=path.name)
            tok.save_pretrained(out)
    except Exception as e:  # noqa: BLE001 - whatever the conversion raises, the weights stand
        print(f"dropup: warning: {where}: no tokenizer from the GGUF ({_first_line(e)}); the "
              "checkpoint has none", file=sys.stderr)
    finally:
        shutil.rmtree(alone, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' info and warnings about GGUF keys it skips are noise here: what matters
    reaches the user as dropup's own line or error."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
