"""``dropup data prepare``: text in, the trainer's token files out (format: ``dropup.data``).

Pipeline: the reader (this thread) parses batches of documents while a worker thread runs the
tokenizer's multithreaded batch encoding on the previous batch, then this thread appends EOS,
assigns each document to train or val and streams the tokens to disk. At most two batches are in
flight, so memory does not grow with the corpus.

The output directory is assembled in a hidden temporary directory beside it and renamed into place
at the end (``hub.atomic``); any failure removes it, so OUT is either complete or absent.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from dropup.data.readers import DOC_SPLITS, InputFile, ReadOptions, Totals, discover, read_documents
from dropup.data.tokens import TOKEN_BYTES, TokenWriter, token_byte_lengths, token_dtype
from dropup.errors import UserError
from dropup.hub.atomic import atomic_dir
from dropup.hub.digest import sha256_file
from dropup.options import check_choices, check_ranges, ranged

EOS = "<|endoftext|>"
MIN_TRAINED_VOCAB = 257  # the 256 byte tokens of a byte-level BPE plus the end-of-document token
MAX_WORKERS = 1024  # more tokenizer processes than any machine has cores is a typo
MAX_MB = 2**40  # a megabyte count this large does not fit in memory or in an int64 of bytes


@dataclass
class PrepareOptions:
    inputs: list[str]
    out: str
    tokenizer: str = "train"  # a Hugging Face tokenizer directory, or "train"
    # --tokenizer train: size of the byte-level BPE vocabulary, and the text sampled to train it on
    vocab_size: int = ranged(32000, ge=MIN_TRAINED_VOCAB, le=2**32, integer=True,
                             hint=f"at least {MIN_TRAINED_VOCAB}: 256 bytes + EOS")
    tokenizer_sample_mb: float = ranged(64.0, gt=0, le=MAX_MB)
    text_key: str = "text"
    eos_token: str | None = None  # the token ending each document; None: the tokenizer's end-of-text
    globs: list[str] = field(default_factory=list)
    doc_split: Literal[*DOC_SPLITS] = "file"  # .txt/.md: one document per file, paragraph or line
    domain: str | None = None
    val_fraction: float = ranged(0.01, ge=0, lt=1, hint="the share of documents held out for validation")
    seed: int = ranged(0, ge=0, le=2**64 - 1, integer=True)
    dtype: Literal["auto", "uint16", "uint32"] = "auto"  # of the token files; auto: the smallest that fits
    skip_bad: bool = False
    strict_utf8: bool = False
    batch_mb: float = ranged(4.0, gt=0, le=MAX_MB)  # text per worker call: amortises the per-call cost (4 MB: 82-84% of bare
    # encode speed in benchmarks/data_bench.py against 72-78% with 1 MB); 2 per worker in flight
    threads: int = ranged(0, ge=0, le=MAX_WORKERS, integer=True, hint="0: one per core")  # tokenizer worker processes
    progress: bool = True

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.text_key, self.doc_split, self.skip_bad, self.strict_utf8)

    def validate(self) -> None:
        """Every option checked at once, before any file is opened."""
        check_choices(self)
        if not self.inputs:
            raise UserError("no inputs given")
        # The vocabulary options only mean something when the tokenizer is trained here.
        check_ranges(self, skip=() if self.tokenizer == "train" else ("vocab_size", "tokenizer_sample_mb"))
        if self.tokenizer == "train":
            if self.eos_token not in (None, EOS):
                raise UserError(f"--eos-token {self.eos_token!r}: a tokenizer trained here ends documents "
                                f"with {EOS}; --eos-token is for a given --tokenizer")
            if self.dtype != "auto":
                _check_dtype(self.vocab_size, self.dtype)
        elif not Path(self.tokenizer).is_dir():
            raise UserError(f"--tokenizer {self.tokenizer}: not a directory (a Hugging Face tokenizer "
                            "directory, or 'train')")


def _check_dtype(vocab_size: int, dtype: str) -> None:
    if vocab_size > np.iinfo(dtype).max + 1:
        raise UserError(f"a vocabulary of {vocab_size} tokens does not fit in {dtype} "
                        f"(at most {np.iinfo(dtype).max + 1} ids); use --dtype uint32 or auto")


def _uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) draw per document index (splitmix64 of seed and index): the same document
    gets the same draw however the corpus is batched or threaded."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


# ---- tokenizers -----------------------------------------------------------------------------------


@dataclass
class LoadedTokenizer:
    backend: object  # tokenizers.Tokenizer
    hf: object  # transformers.PreTrainedTokenizerFast
    eos_id: int  # the document separator appended to every document
    vocab_size: int
    source: str
    eos_token: str = ""
    eos_choice: str = "the tokenizer's eos token"  # why this separator (meta.json records it)


# An instruct tokenizer's eos is often its chat turn separator; documents of a pre-training corpus
# end with end-of-text, which such tokenizers keep as a token of its own.
_CHAT_SEPARATORS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")
_END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end▁of▁sentence|>")


def load_tokenizer(path: str | os.PathLike, eos_token: str | None = None) -> LoadedTokenizer:
    """A Hugging Face tokenizer directory via ``AutoTokenizer`` (fast tokenizers only: their Rust
    backend does the multithreaded batch encoding), with the token that ends each document:
    ``eos_token`` when given, else the tokenizer's end-of-text token (``eos``, unless that is a
    chat turn separator and an end-of-text token of its own exists)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... for a bad directory
        raise UserError(f"--tokenizer {path}: not a loadable tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"--tokenizer {path}: only fast (tokenizer.json) tokenizers are supported")
    vocab = hf.get_vocab()
    if eos_token is not None:
        if eos_token not in vocab:
            raise UserError(f"--eos-token {eos_token!r} is not a token of {path}; name one of its tokens, "
                            f"e.g. {hf.eos_token!r}")
        return LoadedTokenizer(backend, hf, vocab[eos_token], len(hf), str(path), eos_token, "--eos-token")
    if hf.eos_token_id is None:
        raise UserError(f"--tokenizer {path}: the tokenizer has no end-of-document (eos) token; "
                        "name one with --eos-token")
    if hf.eos_token in _CHAT_SEPARATORS:
        for end in _END_OF_TEXT:
            if end in vocab:
                return LoadedTokenizer(backend, hf, vocab[end], len(hf), str(path), end,
                                       f"end-of-text, not the eos {hf.eos_token} (a chat turn separator)")
    return LoadedTokenizer(backend, hf, int(hf.eos_token_id), len(hf), str(path), hf.eos_token)


def train_tokenizer(texts: list[str], vocab_size: int, out: str | os.PathLike) -> LoadedTokenizer:
    """Train a byte-level BPE (every string encodes, and decoding gives it back exactly) and save
    it where ``transformers.AutoTokenizer`` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, model_max_length=1 << 30)
    hf.save_pretrained(str(out))
    return load_tokenizer(out)


def sample_documents(files: list[InputFile], ropts: ReadOptions, budget_bytes: int, seed: int) -> list[str]:
    """A seeded uniform sample of documents, up to ``budget_bytes`` of text, in one pass and
    bounded memory: keep the documents with the smallest per-document draws (bottom-k)."""
    heap: list[tuple[float, int, str]] = []  # (-draw, index, text): the largest draw on top
    size, index = 0, 0
    for inp in files:
        for text in read_documents(inp, ropts):
            u = float(_uniform(seed + 1, np.array([index]))[0])
            index += 1
            if heap and size >= budget_bytes and u >= -heap[0][0]:
                continue
            heapq.heappush(heap, (-u, index, text))
            size += len(text)
            while size > budget_bytes and len(heap) > 1:
                size -= len(heapq.heappop(heap)[2])
    return [t for _, _, t in sorted(heap, key=lambda e: e[1])]



# ---- the pipeline -------------------------------------------------------------------------------


def _batches(files: list[InputFile], ropts: ReadOptions, batch_bytes: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for inp in files:
        for text in read_documents(inp, ropts):
            batch.append(text)
            size += len(text)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class _Progress:
    def __init__(self, enabled: bool):
        self.bar = None
        self.t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                TextColumn("{task.fields[docs]:,} docs  {task.fields[tokens]:,} tokens  "
                                           "{task.fields[rate]:,.0f} tokens/s"), TimeElapsedColumn(),
                                transient=True)
            self.task = self.bar.add_task("tokenising", docs=0, tokens=0, rate=0.0)
            self.bar.start()

    def update(self, docs: int, tokens: int, what: str = "tokenising") -> None:
        if self.bar is not None:
            rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, description=what, docs=docs, tokens=tokens, rate=rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# Worker processes: each holds its own single-threaded copy of the tokenizer. Encoding and the
# conversion of token ids to numpy (a Python loop over every token) then run in parallel, while
# this process only reads, splits and writes; in one process the ids conversion and the reading
# would share the cores with the tokenizer's threads and slow them down.
_worker_tok = None
_worker_eos = 0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _init_worker(tokenizer_json: str, eos_id: int) -> None:
    global _worker_tok, _worker_eos
    from tokenizers import Tokenizer

    # The parent owns the workers' lifetime: on Ctrl-C or SIGTERM (sent to the whole process
    # group by terminals and schedulers) it stops the pool itself, and a worker that raised too
    # would only print a traceback of its own. The worker was forked with both signals blocked
    # (see _worker_pool); ignoring them discards any that arrived meanwhile.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _die_with_parent()

    _worker_tok, _worker_eos = Tokenizer.from_str(tokenizer_json), eos_id


def _die_with_parent() -> None:
    """A parent killed outright (SIGKILL) cannot stop its pool: on Linux, ask the kernel to send
    this worker SIGKILL when the parent dies, so no orphaned tokenizer keeps running."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of a batch, EOS after every document: (flat ids as uint32, lengths, each
    document's UTF-8 bytes: the denominator of bits per byte)."""
    ids = [e.ids for e in _worker_tok.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    flat = np.empty(int(lengths.sum()), dtype=np.uint32)
    ends = np.cumsum(lengths) - 1
    flat[ends] = _worker_eos
    body = np.ones(flat.size, dtype=bool)
    body[ends] = False
    flat[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=flat.size - len(ids))
    text_bytes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.int64,
                             count=len(texts))
    return flat, lengths, text_bytes


def _worker_pool(workers: int, tok: LoadedTokenizer) -> ProcessPoolExecutor:
    """A pool whose forked workers (cheap: no re-import of torch) are already running.

    A fork copies this process's Python signal handlers, so a SIGTERM to the process group while a
    worker is still starting would raise the CLI's interrupt inside the worker and print its
    traceback. The workers are therefore forked with SIGINT and SIGTERM blocked, and their
    initializer ignores both before unblocking them. The tokenizers library notices the fork and
    runs single-threaded in the children, which is what we want there; setting
    TOKENIZERS_PARALLELISM while they fork only silences its warning about it."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(tok.backend.to_str(), tok.eos_id))
    env_before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if hasattr(signal, "pthread_sigmask") else None
    try:
        pool.submit(int)  # under fork, the first submit starts every worker, here and now
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if env_before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
    return pool


class _ByteCounts:
    """Per split: the documents' exact UTF-8 bytes, the token-bytes table's sum over their tokens,
    and the documents on which the two differ (meta.json records all three)."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self.counts: dict[str, list[int]] = {}

    def add(self, split: str, tokens: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray) -> None:
        if not lengths.size:
            return
        per_doc = np.add.reduceat(self.table[tokens.astype(np.int64)], np.cumsum(lengths) - lengths)
        c = self.counts.setdefault(split, [0, 0, 0])
        c[0] += int(text_bytes.sum())
        c[1] += int(per_doc.sum())
        c[2] += int((per_doc != text_bytes).sum())

    def meta(self) -> dict[str, dict]:
        return {split: {"bytes": b, "token_bytes": t, "token_bytes_mismatched_docs": m}
                for split, (b, t, m) in self.counts.items()}


def _tokenize_into(writer: TokenWriter, tok: LoadedTokenizer, files: list[InputFile], opts: PrepareOptions,
                   progress: _Progress, byte_counts: _ByteCounts) -> None:
    ropts = opts.read_options()
    docs_done, tokens_done = 0, 0
    # Each document's split is a seeded draw, so a small corpus can draw no validation document at
    # all (5% of 10 documents: 60% of the time) and training would then fail for want of a 'val'
    # split. Until a draw lands in val, the latest train document is held back; if none ever
    # does, it becomes the validation split. With any val draw the output is exactly the draws'.
    held: list[tuple[np.ndarray, int]] = []  # at most one document: (tokens, UTF-8 bytes)
    val_seen = False

    def add_doc(split: str, tokens: np.ndarray, text_bytes: int) -> None:
        writer.add(tokens, split)
        byte_counts.add(split, tokens, np.array([tokens.size]), np.array([text_bytes]))

    def write_train(tokens: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray) -> None:
        if held:
            add_doc("train", *held.pop())
        if lengths.size:
            writer.add_batch(tokens, lengths, "train")
            byte_counts.add("train", tokens, lengths, text_bytes)

    def write(n_docs: int, owners: list[InputFile], result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        nonlocal docs_done, tokens_done, val_seen
        flat, lengths, text_bytes = result
        is_val = _uniform(opts.seed, np.arange(docs_done, docs_done + n_docs)) < opts.val_fraction
        token_is_val = np.repeat(is_val, lengths)
        train_tokens, train_lengths, train_bytes = flat[~token_is_val], lengths[~is_val], text_bytes[~is_val]
        val_seen = val_seen or bool(is_val.any())
        if val_seen or opts.val_fraction == 0:
            write_train(train_tokens, train_lengths, train_bytes)
        elif train_lengths.size:
            last = int(train_lengths[-1])
            write_train(train_tokens[:train_tokens.size - last], train_lengths[:-1], train_bytes[:-1])
            held.append((train_tokens[train_tokens.size - last:].copy(), int(train_bytes[-1])))
        if is_val.any():
            writer.add_batch(flat[token_is_val], lengths[is_val], "val")
            byte_counts.add("val", flat[token_is_val], lengths[is_val], text_bytes[is_val])
        for owner, n in zip(owners, lengths.tolist()):
            owner.tokens += n
        docs_done += n_docs
        tokens_done += flat.size
        progress.update(docs_done, tokens_done)

    # Which file each document of a batch came from, for the manifest's per-file token counts:
    # read_documents counts documents per file as it goes.
    cursor, seen = 0, 0  # files are read in order: the first file that may have unseen docs

    def batch_owners(n: int) -> list[InputFile]:
        nonlocal cursor, seen
        out: list[InputFile] = []
        while len(out) < n:
            f = files[cursor]
            take = min(f.docs - seen, n - len(out))
            out += [f] * take
            seen += take
            if len(out) < n:
                cursor, seen = cursor + 1, 0
        return out

    workers = opts.threads or os.cpu_count() or 1
    pool = _worker_pool(workers, tok)
    window: deque = deque()  # batches in flight, oldest first: results are written in input order
    try:
        for texts in _batches(files, ropts, int(opts.batch_mb * 2**20)):
            window.append((len(texts), batch_owners(len(texts)), pool.submit(_encode_batch, texts)))
            if len(window) > 2 * workers:  # bounded memory: at most 2 batches per worker in flight
                n, owners, fut = window.popleft()
                write(n, owners, fut.result())
        while window:
            n, owners, fut = window.popleft()
            write(n, owners, fut.result())
        if held:
            add_doc("val" if docs_done > 1 else "train", *held.pop())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare(opts: PrepareOptions) -> dict:
    """Run the pipeline; returns meta.json's contents."""
    opts.validate()
    out = Path(opts.out)
    try:
        # An output inside an input directory would be read back as input by the next run.
        with atomic_dir(out, label="output directory", advice="choose a new one or remove it",
                        protect=[("input", i) for i in opts.inputs]) as tmp:
            duplicates: list[str] = []
            files = discover(opts.inputs, opts.globs, duplicates)
            progress = _Progress(opts.progress)
            try:
                _prepare_into(tmp, files, duplicates, opts, progress)
            finally:
                progress.close()
    except OSError as e:
        problem = _output_problem(e, out)
        if problem is None:
            raise
        raise UserError(problem) from None
    from dropup.data.tokens import read_meta

    return read_meta(out)


def _output_problem(e: OSError, out: Path) -> str | None:
    """What an OSError says about writing ``out`` (inputs' errors are named by their readers)."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"the disk holding {out} filled up while writing the dataset; free space or choose "
                "another --out. Nothing was written")
    parent = out.resolve().parent
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename is not None and (
            Path(e.filename).resolve().is_relative_to(parent)):
        return f"cannot write --out {out} ({e.strerror}: {e.filename}); choose a writable directory"
    return None


def _prepare_into(tmp: Path, files: list[InputFile], duplicates: list[str], opts: PrepareOptions,
                  progress: _Progress) -> None:
    t0 = time.perf_counter()
    if opts.tokenizer == "train":
        progress.update(0, 0, "sampling text for the tokenizer")
        fresh = [replace(f) for f in files]
        sample = sample_documents(fresh, opts.read_options(), int(opts.tokenizer_sample_mb * 2**20), opts.seed)
        if not sample:
            raise UserError(_empty_message(fresh))
        progress.update(0, 0, f"training a {opts.vocab_size}-token BPE")
        tok = train_tokenizer(sample, opts.vocab_size, tmp / "tokenizer")
        del sample
    else:
        tok = load_tokenizer(opts.tokenizer, opts.eos_token)
        tok.hf.save_pretrained(str(tmp / "tokenizer"))
    dtype = token_dtype(tok.vocab_size).name if opts.dtype == "auto" else opts.dtype
    _check_dtype(tok.vocab_size, dtype)
    table = token_byte_lengths(tok.hf)
    np.save(tmp / TOKEN_BYTES, table.astype(np.int32))
    byte_counts = _ByteCounts(table)
    with TokenWriter(tmp, tok.vocab_size, tok.eos_id, dtype=dtype) as writer:
        _tokenize_into(writer, tok, files, opts, progress, byte_counts)
        writer.split_meta.update(byte_counts.meta())
        writer.meta["token_bytes"] = TOKEN_BYTES
        totals = Totals.of(files)
        if totals.docs == 0:
            raise UserError(_empty_message(files))
        if writer.count("train")[1] == 0:
            raise UserError(f"all {totals.docs} documents went to the val split; lower --val-fraction")
        writer.meta.update(_meta(opts, tok, tmp, totals, time.perf_counter() - t0))
        if duplicates:
            writer.meta["duplicate_inputs_skipped"] = duplicates


def _empty_message(files: list[InputFile]) -> str:
    t = Totals.of(files)
    extra = []
    if t.empty:
        extra.append(f"{t.empty} empty")
    if t.skipped_bad:
        extra.append(f"{t.skipped_bad} bad records skipped")
    return (f"no documents in the input ({t.files} file{'s' if t.files != 1 else ''}"
            + (f"; {', '.join(extra)}" if extra else "") + ")")


def _meta(opts: PrepareOptions, tok: LoadedTokenizer, tmp: Path, totals: Totals, seconds: float) -> dict:
    from dropup._version import __version__

    return {
        "domain": opts.domain,
        "tokenizer": {"path": "tokenizer", "source": opts.tokenizer, "sha256": sha256_file(tmp / "tokenizer" /
                      "tokenizer.json"), "vocab_size": tok.vocab_size, "eos_token": tok.eos_token,
                      "eos_choice": tok.eos_choice,
                      **({"trained_vocab_size": opts.vocab_size, "sample_mb": opts.tokenizer_sample_mb}
                         if opts.tokenizer == "train" else {})},
        "prepare": {"text_key": opts.text_key, "doc_split": opts.doc_split, "globs": opts.globs,
                    "val_fraction": opts.val_fraction, "seed": opts.seed, "eos_appended": True,
                    "add_special_tokens": False, "dropup_version": __version__},
        "input_docs": totals.docs, "skipped_bad": totals.skipped_bad, "empty_skipped": totals.empty,
        "replaced_utf8": totals.replaced_utf8,
        "inputs": totals.per_file,
    }


def summary_line(meta: dict, out: str, seconds: float | None = None) -> str:
    s = meta["splits"]
    tr, va = s.get("train", {"tokens": 0, "docs": 0}), s.get("val", {"tokens": 0, "docs": 0})
    line = (f"wrote {out}: train {tr['tokens']:,} tokens / {tr['docs']:,} docs, val {va['tokens']:,} tokens / "
            f"{va['docs']:,} docs, {meta['dtype']}, vocabulary {meta['vocab_size']:,}")
    if seconds:
        line += f", {(tr['tokens'] + va['tokens']) / seconds:,.0f} tokens/s"
    return line


def warnings_of(meta: dict) -> list[str]:
    w = []
    if meta.get("replaced_utf8"):
        files = [i["path"] for i in meta["inputs"] if i["replaced_utf8"]]
        w.append(f"replaced {meta['replaced_utf8']} invalid UTF-8 sequence(s) with U+FFFD in "
                 f"{', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")
    if meta.get("skipped_bad"):
        w.append(f"skipped {meta['skipped_bad']} bad record(s) (--skip-bad)")
    if meta.get("empty_skipped"):
        w.append(f"skipped {meta['empty_skipped']} empty document(s)")
    dup = meta.get("duplicate_inputs_skipped")
    if dup:
        w.append(f"read {len(dup)} file(s) once that the inputs reach more than once (links or "
                 f"overlapping inputs): {', '.join(dup[:3])}{' ...' if len(dup) > 3 else ''}")
    return w
