#!/usr/bin/env python3
"""Data pipeline benchmark for `dropup data prepare` (issue 4): end-to-end tokens/s against the
bare `tokenizers` batch-encode speed on the same text (goal: >= 80% of it).

    python benchmarks/data_bench.py [--mb 6] [--vocab-size 16384] [--workdir DIR] [--no-record]

1. text: the built-in corpus (`dropup data corpus`, --mb MB per domain: code, prose, c) as JSONL,
   also written zstd-compressed;
2. a byte-level BPE (`--vocab-size`) trained on a sample of it (untimed);
3. bare: `Tokenizer.encode_batch_fast` (and `encode_batch`) over every document, already in
   memory, in batches of the size the pipeline uses, and in one call; the best of these is the
   reference;
4. end to end: `dropup.prepare.prepare` on the JSONL files (reading, JSON parsing, encoding, EOS,
   split, writing; the tokenizer loaded and saved), and on the .jsonl.zst files.

Every contender runs in this process on a warm page cache; --repeats rounds each run every
contender once in turn (so load from other processes hits them alike), and the best time counts.
The pipeline encodes in worker processes (one single-threaded tokenizer each), the bare rows with
the tokenizer's own thread pool. tokens/s counts the tokenizer's own tokens (EOS excluded) for every row, so the rows
divide the same number by different times. The table is printed and appended to
benchmarks/RESULTS.md under a new heading.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _best_interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    """Best time of each contender over ``repeats`` rounds, each round running every contender
    once in turn: load from other processes then hits all of them alike."""
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=6.0, help="MB of text per domain")
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--batch-mb", type=float, default=4.0, help="the pipeline's --batch-mb")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()

    import numpy as np
    import tokenizers
    import zstandard

    from dropup._version import __version__
    from dropup.data.corpus import CorpusOptions, build_corpus
    from dropup.data.prepare import PrepareOptions, prepare, train_tokenizer
    from dropup.data.readers import InputFile, ReadOptions, read_documents

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dropup-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        build_corpus(CorpusOptions(out=str(work / "corpus"), max_mb=args.mb))
        jsonl = sorted((work / "corpus").glob("*.jsonl"))
        zst = []
        for p in jsonl:
            z = p.with_suffix(".jsonl.zst")
            z.write_bytes(zstandard.ZstdCompressor(level=3).compress(p.read_bytes()))
            zst.append(z)
        texts = [t for p in jsonl for t in read_documents(InputFile(p, "jsonl"), ReadOptions())]
        text_mb = sum(len(t.encode()) for t in texts) / 1e6
        tok = train_tokenizer(texts[:: max(1, len(texts) // 2000)], args.vocab_size, work / "tokenizer")
        backend = tok.backend

        batches, cur, size = [], [], 0
        for t in texts:  # the pipeline's batching: --batch-mb of characters per call
            cur.append(t)
            size += len(t)
            if size >= args.batch_mb * 2**20:
                batches.append(cur)
                cur, size = [], 0
        if cur:
            batches.append(cur)
        n_tokens = sum(len(e.ids) for b in batches for e in backend.encode_batch_fast(b, add_special_tokens=False))

        contenders = {
            f"bare encode_batch_fast ({len(batches)} batches of {args.batch_mb:g} MB)":
                lambda: [backend.encode_batch_fast(b, add_special_tokens=False) for b in batches],
            f"bare encode_batch_fast (one call, {len(texts):,} docs)":
                lambda: backend.encode_batch_fast(texts, add_special_tokens=False),
            f"bare encode_batch ({len(batches)} batches)":
                lambda: [backend.encode_batch(b, add_special_tokens=False) for b in batches],
        }
        bare_names = list(contenders)

        def e2e(inputs):
            def run():
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                meta = prepare(PrepareOptions(inputs=[str(p) for p in inputs], out=str(out),
                                              tokenizer=str(work / "tokenizer"), batch_mb=args.batch_mb,
                                              progress=False))
                total = sum(s["tokens"] - s["docs"] for s in meta["splits"].values())
                assert total == n_tokens, (total, n_tokens)  # the same tokens as the bare encoder
            return run

        contenders["dropup data prepare (.jsonl)"] = e2e(jsonl)
        contenders["dropup data prepare (.jsonl.zst)"] = e2e(zst)
        best = _best_interleaved(contenders, args.repeats)
        rows = list(best.items())
        reference = min(best[n] for n in bare_names)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    header = "| contender | seconds | tokens/s | vs best bare encode |\n|---|---|---|---|"
    lines = [f"| {name} | {t:.2f} | {n_tokens / t:,.0f} | {reference / t:.0%} |" for name, t in rows]
    table = header + "\n" + "\n".join(lines)
    e2e_ratio = reference / best["dropup data prepare (.jsonl)"]
    verdict = (f"{'PASS' if e2e_ratio >= 0.8 else 'FAIL'}: end-to-end (.jsonl) at {e2e_ratio:.0%} of the "
               "best bare batch-encode speed (goal >= 80%)")
    print(table)
    print(verdict)

    if not args.no_record:
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python benchmarks/data_bench.py " + " ".join(sys.argv[1:])
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        section = "\n".join([
            "", f"## Data pipeline (`benchmarks/data_bench.py`): {now}", "",
            f"- command: `{cmd.strip()}`",
            f"- machine: `{' '.join(platform.uname())}`; {os.cpu_count()} cores ({_cpu_model()}), {mem:.1f} GiB RAM",
            f"- versions: python {platform.python_version()}, tokenizers {tokenizers.__version__}, "
            f"numpy {np.__version__}, zstandard {zstandard.__version__}, dropup {__version__}",
            f"- text: built-in corpus, {args.mb:g} MB per domain (code, prose, c): {len(texts):,} documents, "
            f"{text_mb:.1f} MB, {n_tokens:,} tokens with a {tok.vocab_size:,}-token byte-level BPE",
            f"- method: best of {args.repeats} rounds (each round runs every row once, in table order); bare rows encode documents already in memory; end-to-end rows "
            "read, parse, encode, split and write (tokenizer load and save included); tokens/s = the same "
            "token count (EOS excluded) over each row's time; RAYON_NUM_THREADS "
            f"{os.environ.get('RAYON_NUM_THREADS', 'unset (every core)')}",
            "", table, "", f"- {verdict}", ""])
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(section)
    return 0 if e2e_ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
