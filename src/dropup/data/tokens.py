"""Tokenised datasets on disk and the trainer's deterministic view of them.

On-disk format (one directory per dataset, written by ``TokenWriter``; ``dropup data prepare``
produces it from text)::

    DIR/meta.json              {"format": "dropup-tokens", "version": 1, "dtype": "uint16"|"uint32",
                                "vocab_size": V, "eos_token_id": int|null,
                                "splits": {"train": {"tokens": T, "docs": D, "max_token_id": M,
                                                     "bytes": B, "token_bytes": B', ...},
                                           "val": {...}}, "token_bytes": "token_bytes.npy", ...}
    DIR/<split>.bin            all documents' tokens back to back, raw little-endian ``dtype``
    DIR/<split>.offsets.npy    int64 [D + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    DIR/token_bytes.npy        int32 [V]: the UTF-8 bytes each token id stands for (``token_byte_lengths``)

Bits per byte. ``token_bytes.npy`` gives the bytes of any token window, partial documents
included, as the sum of its targets' entries, so BPB = sum NLL / (ln 2 * those bytes) needs no
text. ``data prepare`` records per split the exact UTF-8 bytes of the documents' text
(``bytes``), the table's sum over the same tokens (``token_bytes``) and how many documents the
two disagree on (``token_bytes_mismatched_docs``: 0 for a byte-level BPE; a SentencePiece
tokenizer that adds a prefix space counts that space). Datasets written before the table get it
from their tokenizer when opened (``TokenFile.token_bytes``).

Any further keys in meta.json (tokenizer, manifest of inputs, domain) are the writer's business
and are kept as they are. ``max_token_id`` (the largest id in the split, null when empty) lets a
trainer check the data against its model's vocabulary without reading the tokens; datasets
written before it was recorded are scanned instead. The end-of-document token, when the
tokenizer has one, is already part of each document's tokens.

Training reads *packed* sequences: a split's token stream is cut into windows of ``seq_len + 1``
tokens with stride ``seq_len`` (inputs are the first ``seq_len``, targets the last ``seq_len``),
ignoring document boundaries, as GPT-style pre-training (and the paper's Megatron-based framework)
does; attention therefore crosses document boundaries, separated only by the EOS token.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dropup.errors import UserError
from dropup.hub.atomic import atomic_write_text

FORMAT = "dropup-tokens"
VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenWriter:
    """Stream documents into a dataset directory with bounded memory.

    ::

        with TokenWriter(out, vocab_size=32000, eos_token_id=2) as w:
            for doc in docs:
                w.add(doc_token_ids, split="train")
            w.meta["tokenizer"] = "..."          # extra keys land in meta.json

    ``meta.json`` is written last, so a directory without it is an unfinished dataset; a failure
    inside the ``with`` block removes what was written. Document offsets go to a scratch file as
    they come (a corpus of 10^8 documents would otherwise hold 10^8 Python ints) and become
    ``<split>.offsets.npy`` at the end.
    """

    _OFFSET_FLUSH = 1 << 16  # offsets buffered in memory before they go to the scratch file

    def __init__(self, out: str | os.PathLike, vocab_size: int, eos_token_id: int | None = None,
                 dtype: str | None = None):
        self.out = Path(out)
        if (self.out / "meta.json").exists():
            raise UserError(f"{self.out} already holds a dataset (meta.json); choose another directory")
        self.dtype = np.dtype(dtype) if dtype else token_dtype(vocab_size)
        if self.dtype not in (np.uint16, np.uint32):
            raise UserError(f"token dtype must be uint16 or uint32, got {self.dtype}")
        if vocab_size > np.iinfo(self.dtype).max + 1:
            raise UserError(f"a vocabulary of {vocab_size} tokens does not fit in {self.dtype} "
                            f"(at most {np.iinfo(self.dtype).max + 1}); use uint32")
        self.out.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self.meta: dict = {}
        self._files: dict[str, object] = {}
        self._offset_files: dict[str, object] = {}
        self._pending: dict[str, list[np.ndarray]] = {}
        self._count: dict[str, tuple[int, int]] = {}  # split -> (tokens, docs) so far
        self._max: dict[str, int | None] = {}  # split -> largest token id so far
        self.split_meta: dict[str, dict] = {}  # split -> further keys of its meta.json entry

    def _open(self, split: str) -> None:
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._files:
            self._files[split] = open(self.out / f"{split}.bin", "wb")
            self._offset_files[split] = open(self.out / f".{split}.offsets.tmp", "wb")
            self._pending[split] = []
            self._count[split] = (0, 0)
            self._max[split] = None

    def add(self, tokens, split: str = "train") -> None:
        """Append one document (a sequence of token ids) to ``split``."""
        arr = np.asarray(tokens, dtype=np.int64)
        self.add_batch(arr, np.array([arr.size], dtype=np.int64), split)

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray, split: str = "train") -> None:
        """Append several documents at once: their tokens back to back and each one's length."""
        self._open(split)
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"document lengths add up to {int(lengths.sum())}, not {tokens.size} tokens")
        if tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise UserError(f"token id out of range [0, {self.vocab_size}) in a {split} document")
            self._max[split] = max(hi, self._max[split] if self._max[split] is not None else hi)
        self._files[split].write(tokens.astype(self.dtype, copy=False).tobytes())
        n_tokens, n_docs = self._count[split]
        self._pending[split].append(n_tokens + np.cumsum(lengths))
        self._count[split] = (n_tokens + tokens.size, n_docs + lengths.size)
        if sum(a.size for a in self._pending[split]) >= self._OFFSET_FLUSH:
            self._flush_offsets(split)

    def _flush_offsets(self, split: str) -> None:
        for a in self._pending[split]:
            self._offset_files[split].write(a.astype("<i8", copy=False).tobytes())
        self._pending[split] = []

    def count(self, split: str) -> tuple[int, int]:
        """(tokens, documents) written to ``split`` so far."""
        return self._count.get(split, (0, 0))

    def _finish_offsets(self, split: str) -> None:
        """Scratch file of document ends -> ``<split>.offsets.npy`` ([0, end_0, end_1, ...])."""
        self._flush_offsets(split)
        self._offset_files[split].close()
        tmp = self.out / f".{split}.offsets.tmp"
        n_docs = self._count[split][1]
        with open(self.out / f"{split}.offsets.npy", "wb") as f, open(tmp, "rb") as src:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<i8", "fortran_order": False, "shape": (n_docs + 1,)})
            f.write(np.zeros(1, dtype="<i8").tobytes())
            while chunk := src.read(1 << 22):
                f.write(chunk)
        tmp.unlink()

    def close(self) -> Path:
        splits = {}
        for split, f in self._files.items():
            f.close()
            self._finish_offsets(split)
            tokens, docs = self._count[split]
            splits[split] = {"tokens": tokens, "docs": docs, "max_token_id": self._max[split],
                             **self.split_meta.get(split, {})}
        meta = {**self.meta, "format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
                "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id, "splits": splits}
        atomic_write_text(self.out / "meta.json", json.dumps(meta, indent=1) + "\n")
        return self.out

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        for split, f in self._files.items():
            f.close()
            self._offset_files[split].close()
            for name in (f"{split}.bin", f"{split}.offsets.npy", f".{split}.offsets.tmp"):
                (self.out / name).unlink(missing_ok=True)


def write_dataset(out: str | os.PathLike, docs: dict[str, list], vocab_size: int,
                  eos_token_id: int | None = None, **meta) -> Path:
    """Write ``{"train": [doc, ...], "val": [...]}`` (docs are token-id sequences) in one call."""
    with TokenWriter(out, vocab_size, eos_token_id) as w:
        w.meta.update(meta)
        for split, split_docs in docs.items():
            for doc in split_docs:
                w.add(doc, split)
    return Path(out)


class TokenFile:
    """One split of a dataset, memory-mapped: ``tokens`` (numpy memmap) and ``offsets``.

    Opening checks what is cheap to check (meta.json's shape, the token file's size, the offsets
    file's header, length and ends), so a damaged dataset stops the run with its file's name
    before the first step rather than as an index error somewhere in it."""

    _SCAN = 1 << 24  # tokens per chunk when scanning for the largest id (32-64 MiB)

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        info = self.meta["splits"].get(split)
        if info is None:
            raise UserError(f"dataset {self.path} has no {split!r} split (it has: "
                            f"{', '.join(self.meta['splits']) or 'none'})")
        self.info, self.split = info, split
        self.bin_path = bin_path = self.path / f"{split}.bin"
        dtype = np.dtype(self.meta["dtype"])
        if not bin_path.exists() or bin_path.stat().st_size != info["tokens"] * dtype.itemsize:
            raise UserError(f"{bin_path} is missing or its size does not match meta.json "
                            f"({info['tokens']} tokens of {dtype})")
        self.tokens = (np.memmap(bin_path, dtype=dtype, mode="r") if info["tokens"]
                       else np.zeros(0, dtype=dtype))
        self.offsets = self._open_offsets(self.path / f"{split}.offsets.npy", info)

    @staticmethod
    def _open_offsets(p: Path, info: dict) -> np.ndarray:
        redo = "re-create the dataset with `dropup data prepare`"
        if not p.exists():
            raise UserError(f"{p} is missing; {redo}")
        try:
            offsets = np.load(p, mmap_mode="r")
        except (ValueError, EOFError, OSError) as e:
            raise UserError(f"{p} is truncated or damaged ({str(e) or type(e).__name__}); {redo}") from None
        docs = info.get("docs")
        if (offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 1
                or (docs is not None and len(offsets) != docs + 1)):
            raise UserError(f"{p} holds {offsets.dtype}{list(offsets.shape)}, not the int64[{docs} + 1] "
                            f"document starts meta.json describes; {redo}")
        if int(offsets[0]) != 0 or int(offsets[-1]) != info["tokens"]:
            raise UserError(f"{p} does not span the {info['tokens']} tokens meta.json describes "
                            f"(from {int(offsets[0])} to {int(offsets[-1])}); {redo}")
        return offsets

    def __len__(self) -> int:
        return len(self.tokens)

    def max_token_id(self) -> int | None:
        """The largest token id of the split (None when empty): as meta.json records it, or, for
        a dataset written before it was recorded, from one pass over the tokens."""
        if "max_token_id" in self.info:
            return self.info["max_token_id"]
        if not len(self.tokens):
            return None
        return max(int(self.tokens[i : i + self._SCAN].max()) for i in range(0, len(self.tokens), self._SCAN))

    def check_vocab(self, vocab_size: int, whose: str = "the model's") -> None:
        """``UserError`` if a token id of the split would index past a vocabulary of ``vocab_size``."""
        top = self.max_token_id()
        if top is not None and top >= vocab_size:
            raise UserError(f"{self.bin_path} holds token id {top}, but {whose} vocabulary has {vocab_size} "
                            f"tokens (ids 0 to {vocab_size - 1}); tokenise the data with the model's tokenizer")

    def token_bytes(self) -> np.ndarray | None:
        """The dataset's per-token-id UTF-8 byte lengths (int64 [V]): ``token_bytes.npy``, or for a
        dataset written before it, built from the tokenizer meta.json names; None when the dataset
        has neither (written by ``TokenWriter`` without a tokenizer): no bits per byte then."""
        if not hasattr(self, "_token_bytes"):
            self._token_bytes = dataset_token_bytes(self.path, self.meta)
        return self._token_bytes

    def num_sequences(self, seq_len: int) -> int:
        return max(0, (len(self.tokens) - 1) // seq_len)

    def sequence(self, i: int, seq_len: int) -> np.ndarray:
        """Packed window i: seq_len + 1 tokens starting at i * seq_len."""
        return np.asarray(self.tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64)


TOKEN_BYTES = "token_bytes.npy"


def tokenizer_dir(path: str | os.PathLike, meta: dict) -> Path | None:
    """The directory of the tokenizer the dataset was made with (meta.json ``tokenizer.path``,
    relative to the dataset; ``data prepare`` saves it there), or None when it names none."""
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("path"), str) or not tok["path"]:
        return None
    tdir = Path(path) / tok["path"]
    return tdir if tdir.is_dir() else None


def dataset_token_bytes(path: str | os.PathLike, meta: dict) -> np.ndarray | None:
    """See ``TokenFile.token_bytes``."""
    path = Path(path)
    table_path = path / meta.get("token_bytes", TOKEN_BYTES)
    if table_path.is_file():
        table = np.load(table_path).astype(np.int64)
        if table.ndim != 1 or len(table) < meta["vocab_size"] or (table < 0).any():
            raise UserError(f"{table_path} holds {table.dtype}{list(table.shape)}, not the non-negative "
                            f"byte length of each of the {meta['vocab_size']} token ids; re-create the "
                            "dataset with `dropup data prepare`")
        return table
    tdir = tokenizer_dir(path, meta)
    if tdir is None or not (tdir / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    table = token_byte_lengths(AutoTokenizer.from_pretrained(str(tdir), local_files_only=True))
    if len(table) < meta["vocab_size"]:  # ids the tokenizer does not name stand for no text
        table = np.concatenate([table, np.zeros(meta["vocab_size"] - len(table), dtype=np.int64)])
    return table


def _byte_level_decoder(hf_tokenizer) -> bool:
    """Whether the tokenizer decodes through ByteLevel (GPT-2 style: each character of a token
    stands for one byte), read from its tokenizer.json."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False

    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(json.loads(backend.to_str()).get("decoder"))


def token_byte_lengths(hf_tokenizer) -> np.ndarray:
    """int64 [len(tokenizer)]: the UTF-8 bytes of the text each token id decodes to.

    Byte-level BPE tokens are fixed byte strings (one byte per character of the token, through
    GPT-2's byte-to-character map); SentencePiece pieces count "▁" as the space it decodes to
    and a ``<0xNN>`` byte-fallback piece as one byte; special tokens (EOS, padding, chat markers)
    stand for no text and count 0; other added tokens count their content's UTF-8 bytes. The
    bytes of a span are then the sum over its tokens, whatever the span's boundaries."""
    from tokenizers.pre_tokenizers import ByteLevel

    byte_chars = set(ByteLevel.alphabet())  # the 256 characters that stand for one byte each
    byte_level = _byte_level_decoder(hf_tokenizer)
    added = {i: t for i, t in hf_tokenizer.added_tokens_decoder.items()}
    special = set(hf_tokenizer.all_special_ids)
    n = len(hf_tokenizer)
    out = np.zeros(n, dtype=np.int64)
    for i, piece in enumerate(hf_tokenizer.convert_ids_to_tokens(list(range(n)))):
        if piece is None or i in special or (i in added and added[i].special):
            continue
        if i in added:
            out[i] = len(added[i].content.encode("utf-8"))
        elif byte_level:
            out[i] = sum(1 if c in byte_chars else len(c.encode("utf-8")) for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def read_meta(path: str | os.PathLike) -> dict:
    p = Path(path) / "meta.json"
    if not p.exists():
        raise UserError(f"{p} not found: a dataset directory is written by `dropup data prepare` "
                        "(or dropup.data.TokenWriter)")
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON ({e})") from None
    redo = "re-create the dataset with `dropup data prepare`"
    if not isinstance(meta, dict):
        raise UserError(f"{p} is damaged: it holds a JSON {type(meta).__name__}, not an object; {redo}")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{p} is not a {FORMAT} v{VERSION} dataset")
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{p} is damaged: {problem}; {redo}")
    return meta


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the keys a reader relies on, if anything."""
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype is {meta.get('dtype')!r}, not uint16 or uint32"
    if not _count(meta.get("vocab_size")) or meta["vocab_size"] < 1:
        return f"vocab_size is {meta.get('vocab_size')!r}, not a positive integer"
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        if splits is None:
            return "it has no 'splits' object"
        return f"'splits' is a {type(splits).__name__}, not an object"
    for name, info in splits.items():
        if not isinstance(info, dict):
            return f"split {name!r} is a {type(info).__name__}, not an object"
        for key in ("tokens", "docs"):
            if (key in info or key == "tokens") and not _count(info.get(key)):
                return f"split {name!r} has {key} {info.get(key)!r}, not a count"
        top = info.get("max_token_id")
        if top is not None and not (_count(top) and top < meta["vocab_size"]):
            return f"split {name!r} has max_token_id {top!r}, not an id below vocab_size {meta['vocab_size']}"
    return None


@dataclass
class Source:
    name: str
    file: TokenFile
    weight: float


class Mixture:
    """A weighted mixture of datasets, read in a fixed order that depends only on the seed.

    Global sample g (0, 1, 2, ...) is decided without looking at any other sample, so a run can
    restart at any step and a data-parallel rank can read only its own samples. Samples come in
    blocks of ``BLOCK``: each block holds a fixed count of samples of each dataset (the weights,
    rounded by largest remainder) in a seeded shuffled order; a dataset's samples are drawn
    epoch by epoch, each epoch a fresh seeded permutation of its packed sequences.
    """

    BLOCK = 4096

    def __init__(self, sources: list[Source], seq_len: int, seed: int):
        self.sources, self.seq_len, self.seed = sources, seq_len, seed
        for s in sources:
            if s.file.num_sequences(seq_len) < 1:
                raise UserError(f"dataset {s.name} ({s.file.path}) has {len(s.file)} train tokens: "
                                f"fewer than one sequence of {seq_len + 1}")
        total = sum(s.weight for s in sources)
        quotas = [s.weight / total * self.BLOCK for s in sources]
        counts = [math.floor(q) for q in quotas]
        for i in sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])[: self.BLOCK - sum(counts)]:
            counts[i] += 1
        self.per_block = counts
        self._block_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset of each position of block b, and how many of that dataset precede it in b."""
        if b not in self._block_cache:
            which = np.repeat(np.arange(len(self.sources)), self.per_block)
            which = which[self._rng(0, b).permutation(self.BLOCK)]
            rank_in = np.zeros(self.BLOCK, dtype=np.int64)
            for d in range(len(self.sources)):
                idx = np.flatnonzero(which == d)
                rank_in[idx] = np.arange(len(idx))
            self._block_cache = {b: (which, rank_in)}  # a run reads blocks in order: keep one
        return self._block_cache[b]

    def _sequence_index(self, d: int, k: int) -> int:
        n = self.sources[d].file.num_sequences(self.seq_len)
        epoch, i = divmod(k, n)
        key = (d, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k2: v for k2, v in self._perm_cache.items() if k2[0] != d}
            self._perm_cache[key] = self._rng(1, d, epoch).permutation(n)
        return int(self._perm_cache[key][i])

    def sample(self, g: int) -> tuple[int, np.ndarray]:
        """(dataset index, seq_len + 1 tokens) of global sample g."""
        b, pos = divmod(g, self.BLOCK)
        which, rank_in = self._block(b)
        d = int(which[pos])
        k = b * self.per_block[d] + int(rank_in[pos])  # how many samples of d came before g
        return d, self.sources[d].file.sequence(self._sequence_index(d, k), self.seq_len)

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Global samples start .. start + size - 1 as a [size, seq_len + 1] int64 tensor."""
        return torch.from_numpy(np.stack([self.sample(g)[1] for g in range(start, start + size)]))


def validation_batches(file: TokenFile, seq_len: int, batch: int, max_batches: int) -> list[torch.Tensor]:
    """The first ``max_batches`` batches of a validation split in order (the same every eval)."""
    n = min(file.num_sequences(seq_len), batch * max_batches)
    seqs = [file.sequence(i, seq_len) for i in range(n)]
    return [torch.from_numpy(np.stack(seqs[i : i + batch])) for i in range(0, n, batch)]
