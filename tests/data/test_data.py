"""`dropup data prepare` and `dropup data corpus`: token counts and round trips, every input format
and compression, seeded splits, bounded memory, the built-in corpus, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dropup.cli import main as cli_main
from dropup.data.corpus import CorpusOptions, build_corpus, man_to_text
from dropup.data.prepare import PrepareOptions, _uniform, load_tokenizer, prepare
from dropup.data.tokens import Mixture, Source, TokenFile

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Drop-Upcycling re-initialises half of each expert's neurons.",
    "Ünïcödé text: naïve café, 日本語のテキスト, emoji 🙂 and a tab\there.",
    "  leading and trailing spaces, and\r\nWindows line ends  ",
    "#include <stdio.h>\nint main(void) { printf(\"hi\\n\"); return 0; }",
] + [f"Document number {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(i % 40 + 5))
     for i in range(60)]


def _prep(tmp: Path, inputs, name: str, **kw) -> Path:
    opts = PrepareOptions(inputs=[str(i) for i in inputs], out=str(tmp / name), progress=False, **kw)
    prepare(opts)
    return tmp / name


def _docs_of(out: Path, split: str = "train") -> list[np.ndarray]:
    f = TokenFile(out, split)
    return [np.asarray(f.tokens[f.offsets[i] : f.offsets[i + 1]]) for i in range(len(f.offsets) - 1)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained by `prepare --tokenizer train` (reused by the other tests)."""
    tmp = tmp_path_factory.mktemp("tok")
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 3))
    out = _prep(tmp, [src], "trained", vocab_size=400, val_fraction=0.0)
    return out / "tokenizer"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_token_counts_and_decoding_match_the_tokenizer(tmp_path, tokenizer_dir, tok):
    from transformers import AutoTokenizer

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = _prep(tmp_path, [src], "ds", tokenizer=str(tokenizer_dir), val_fraction=0.3, seed=3)
    meta = json.loads((out / "meta.json").read_text())
    is_val = _uniform(3, np.arange(len(DOCS))) < 0.3
    expect = {"train": [d for d, v in zip(DOCS, is_val) if not v], "val": [d for d, v in zip(DOCS, is_val) if v]}
    assert expect["val"] and expect["train"]
    hf = AutoTokenizer.from_pretrained(out / "tokenizer")  # the saved tokenizer loads with transformers
    for split, texts in expect.items():
        got = _docs_of(out, split)
        assert len(got) == len(texts) == meta["splits"][split]["docs"]
        for text, ids in zip(texts, got):
            own = hf(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(own) + 1 and ids[-1] == hf.eos_token_id  # EOS appended
            assert hf.decode(ids[:-1].tolist()) == text  # decoding gives the source text back
        assert sum(len(t) for t in got) == meta["splits"][split]["tokens"]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(hf)
    assert meta["inputs"][0]["docs"] == len(DOCS) and len(meta["inputs"][0]["sha256"]) == 64
    assert meta["inputs"][0]["tokens"] == meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert meta["tokenizer"]["sha256"] == json.loads((tokenizer_dir.parent / "meta.json").read_text())[
        "tokenizer"]["sha256"]


def _write_all_formats(root: Path, docs: list[str]) -> dict[str, list[Path]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    root.mkdir()
    out: dict[str, list[Path]] = {}
    (root / "txt").mkdir()
    for i, d in enumerate(docs):  # one document per file, and a name order that is not numeric
        (root / "txt" / f"doc{i:03d}{'.md' if i % 2 else '.txt'}").write_bytes(d.encode())
    out["txt dir"] = [root / "txt"]
    (root / "a.jsonl").write_bytes(lines)
    out["jsonl"] = [root / "a.jsonl"]
    (root / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    out["jsonl.gz"] = [root / "b.jsonl.gz"]
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    out["jsonl.zst"] = [root / "c.jsonl.zst"]
    arr = json.dumps([{"text": d} for d in docs], indent=2).encode()
    (root / "d.json").write_bytes(arr)
    out["json array"] = [root / "d.json"]
    (root / "e.json.gz").write_bytes(gzip.compress(arr))
    out["json.gz"] = [root / "e.json.gz"]
    (root / "split").mkdir()
    for i, d in enumerate(docs):
        suffix = [".txt.gz", ".md.zst", ".txt"][i % 3]
        raw = d.encode()
        raw = gzip.compress(raw) if suffix.endswith(".gz") else (
            zstandard.ZstdCompressor().compress(raw) if suffix.endswith(".zst") else raw)
        (root / "split" / f"d{i:03d}{suffix}").write_bytes(raw)
    out["txt.gz/.md.zst"] = [root / "split"]
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, root / "f.parquet", row_group_size=7)
    out["parquet"] = [root / "f.parquet"]
    # datasets.save_to_disk layout (written here without the datasets package): Arrow stream files
    # listed in state.json, the text split over two shards.
    hf = root / "hf"
    hf.mkdir()
    half = len(docs) // 2
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, part in zip(names, (docs[:half], docs[half:])):
        t = pa.table({"text": part})
        with pa.ipc.new_stream(str(hf / name), t.schema) as w:
            for batch in t.to_batches(max_chunksize=5):
                w.write_batch(batch)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (hf / "dataset_info.json").write_text("{}")
    out["save_to_disk"] = [hf]
    # A directory mixing formats, read through a glob filter.
    (root / "mixed").mkdir()
    (root / "mixed" / "keep.jsonl").write_bytes(lines)
    (root / "mixed" / "skip.txt").write_text("not selected by the glob")
    out["dir + glob"] = [root / "mixed"]
    return out


def test_every_format_and_compression_gives_the_same_tokens(tmp_path, tokenizer_dir):
    docs = DOCS[:30]
    formats = _write_all_formats(tmp_path / "in", docs)
    reference = None
    for i, (name, inputs) in enumerate(formats.items()):
        out = _prep(tmp_path, inputs, f"out{i}", tokenizer=str(tokenizer_dir), val_fraction=0.0,
                    globs=["*.jsonl"] if name == "dir + glob" else [])
        got = [t.tolist() for t in _docs_of(out)]
        if reference is None:
            reference = got
        assert len(got) == len(docs), name
        assert got == reference, name
        meta = json.loads((out / "meta.json").read_text())
        assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in meta["inputs"]), name


def test_split_is_reproducible_from_the_seed_and_output_is_byte_identical(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 4))
    a = _prep(tmp_path, [src], "a", vocab_size=350, val_fraction=0.25, seed=7)
    b = _prep(tmp_path, [src], "b", vocab_size=350, val_fraction=0.25, seed=7, batch_mb=0.0005)
    c = _prep(tmp_path, [src], "c", vocab_size=350, val_fraction=0.25, seed=8)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert "tokenizer/tokenizer.json" in files and "val.bin" in files
    for rel in files:  # a trained tokenizer too: same inputs and seed, same bytes
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "val.bin").read_bytes() != (c / "val.bin").read_bytes()
    # A prepared directory plugs into the trainer's mixture.
    mix = Mixture([Source("a", TokenFile(a), 1.0), Source("c", TokenFile(c), 3.0)], seq_len=16, seed=0)
    assert mix.batch(0, 4).shape == (4, 17)


@pytest.mark.parametrize("batch_mb", [8.0, 0.0001])  # one batch, and a batch per document
def test_a_small_corpus_whose_draws_miss_val_still_gets_a_validation_document(tmp_path, tokenizer_dir, batch_mb):
    """Seen in CI: the tiny demo's code domain had too few documents for a 5% draw to hit, and
    training then stopped for want of a 'val' split. The last document becomes val instead."""
    docs = DOCS[:12]
    seed = next(s for s in range(1000) if not (_uniform(s, np.arange(len(docs))) < 0.05).any())
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = _prep(tmp_path, [src], f"ds{batch_mb}", tokenizer=str(tokenizer_dir), val_fraction=0.05, seed=seed,
                batch_mb=batch_mb)
    tok = load_tokenizer(tokenizer_dir)
    ids = [tok.backend.encode(d, add_special_tokens=False).ids + [tok.eos_id] for d in docs]
    assert [t.tolist() for t in _docs_of(out, "train")] == ids[:-1]
    assert [t.tolist() for t in _docs_of(out, "val")] == ids[-1:]
    assert list(json.loads((out / "meta.json").read_text())["splits"]) == ["train", "val"]
    # With no validation asked for, or a single document, nothing moves.
    none = _prep(tmp_path, [src], f"none{batch_mb}", tokenizer=str(tokenizer_dir), val_fraction=0.0,
                 batch_mb=batch_mb)
    assert [t.tolist() for t in _docs_of(none, "train")] == ids
    assert not (none / "val.bin").exists()
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": docs[0]}) + "\n")
    single = _prep(tmp_path, [one], f"single{batch_mb}", tokenizer=str(tokenizer_dir), val_fraction=0.05,
                   seed=seed, batch_mb=batch_mb)
    assert [t.tolist() for t in _docs_of(single, "train")] == ids[:1]


@pytest.mark.slow  # 112 MB of JSONL written and prepared
def test_memory_stays_bounded_on_a_large_input(tmp_path, tokenizer_dir):
    """Peak RSS of a prepare run hardly grows from a 16 MB to a 96 MB input (JSONL whose records
    carry a large non-text field, so the run stays quick on one core). The first ~16 MB warm up
    the allocator and the tokenizer's caches; after that the peak is flat."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]

    def write(path: Path, mb: int) -> None:
        pad = "x" * 3000
        with open(path, "w") as f:
            size, i = 0, 0
            while size < mb * 2**20:
                text = " ".join(rng.choice(words, 60))
                line = json.dumps({"meta": pad, "text": f"{i} {text}"}) + "\n"
                f.write(line)
                size += len(line)
                i += 1

    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peaks = {}
    for mb in (16, 96):
        src = tmp_path / f"in{mb}.jsonl"
        write(src, mb)
        cmd = [sys.executable, "-c", probe, sys.executable, "-m", "dropup", "data", "prepare", str(src),
               "--out", str(tmp_path / f"out{mb}"), "--tokenizer", str(tokenizer_dir), "--quiet",
               "--batch-mb", "0.5"]
        r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        peaks[mb] = int(r.stdout.split()[-1]) / 1024  # KiB -> MiB
        src.unlink()
    assert peaks[96] - peaks[16] < 20, peaks  # 80 MB more input, under 20 MiB more memory


@pytest.mark.slow  # two harvests of the machine's files
def test_corpus_has_three_domains_and_is_deterministic(tmp_path):
    m1 = build_corpus(CorpusOptions(out=str(tmp_path / "c1"), max_mb=0.15))
    m2 = build_corpus(CorpusOptions(out=str(tmp_path / "c2"), max_mb=0.15))
    found = {d: m["docs"] for d, m in m1["domains"].items() if m["docs"] > 0}
    assert len(found) >= 3, m1["domains"]
    assert {d: m["docs"] for d, m in m2["domains"].items() if m["docs"] > 0} == found
    for d in found:
        assert (tmp_path / "c1" / f"{d}.jsonl").read_bytes() == (tmp_path / "c2" / f"{d}.jsonl").read_bytes()
        texts = [json.loads(line)["text"] for line in (tmp_path / "c1" / f"{d}.jsonl").open()]
        assert len(set(texts)) == len(texts)  # deduplicated
        assert 0.15e6 <= m1["domains"][d]["bytes"] < 0.15e6 + 256 * 1024  # the cap, plus one file
    code = json.loads((tmp_path / "c1" / "code.jsonl").open().readline())
    assert code["source"].endswith(".py")
    # It feeds `data prepare`, one dataset per domain with a shared tokenizer.
    a = _prep(tmp_path, [tmp_path / "c1" / "code.jsonl"], "code", vocab_size=300, domain="code")
    assert json.loads((a / "meta.json").read_text())["domain"] == "code"


def test_man_page_markup_is_stripped():
    src = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n.B \\-a\ndo not ignore\n'
    text = man_to_text(src)
    assert "comment" not in text and "\\f" not in text
    assert "ls - list directory contents" in text and "NAME" in text and "-a" in text


# ---- bad input: one line on stderr, exit 2, nothing left behind ----------------------------------------


def _bad_cases(tmp: Path, tokenizer_dir: Path) -> dict:
    tmp.mkdir()
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.txt").write_text("  \n\n")
    (tmp / "emptydir").mkdir()
    (tmp / "badjson.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp / "nokey.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (tmp / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello"}\n' * 50)[:40])
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait, cr\xe8me".encode("latin-1"))
    (tmp / "good.jsonl").write_text('{"text": "hello world"}\n')
    (tmp / "doc.bz2").write_bytes(b"BZh9")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("existing")
    tok = ["--tokenizer", str(tokenizer_dir)]
    return {
        "empty file": ([tmp / "empty.jsonl", *tok], "no documents in the input"),
        "blank text": ([tmp / "blank.txt", *tok], "1 empty"),
        "empty dir": ([tmp / "emptydir", *tok], "no input files found"),
        "missing input": ([tmp / "nope.jsonl", *tok], "does not exist"),
        "bad json line": ([tmp / "badjson.jsonl", *tok], "badjson.jsonl:2: not valid JSON"),
        "missing field": ([tmp / "nokey.jsonl", *tok], "nokey.jsonl:2: no 'text' field"),
        "bad parquet": ([tmp / "bad.parquet", *tok], "not a readable Parquet file"),
        "truncated gzip": ([tmp / "trunc.jsonl.gz", *tok], "corrupt or truncated gzip"),
        "strict utf-8": ([tmp / "latin1.txt", "--strict-utf8", *tok], "latin1.txt: bytes that are not UTF-8"),
        "dtype too small": ([tmp / "good.jsonl", "--vocab-size", "70000", "--dtype", "uint16"],
                            "does not fit in uint16"),
        "unknown type": ([tmp / "doc.bz2", *tok], "unknown file type"),
    }


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, tokenizer_dir, capsys):
    cases = _bad_cases(tmp_path / "in", tokenizer_dir)
    for name, (args, message) in cases.items():
        out = tmp_path / "out" / name.replace(" ", "_")
        code = cli_main(["data", "prepare", *map(str, args), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists(), name
        assert not list((tmp_path / "out").glob(".*")) if (tmp_path / "out").exists() else True, name
    # Output directory not empty: refused, and what it holds is untouched.
    full = tmp_path / "in" / "full"
    code = cli_main(["data", "prepare", str(tmp_path / "in" / "good.jsonl"), "--out", str(full), "--quiet",
                     "--tokenizer", str(tokenizer_dir)])
    assert code == 2 and "is not empty" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_lenient_modes_replace_and_skip_and_count(tmp_path, tokenizer_dir, capsys):
    cases = _bad_cases(tmp_path / "in", tokenizer_dir)
    del cases
    tok = ["--tokenizer", str(tokenizer_dir), "--val-fraction", "0"]
    out = tmp_path / "latin"
    assert cli_main(["data", "prepare", str(tmp_path / "in" / "latin1.txt"), "--out", str(out), *tok]) == 0
    err = capsys.readouterr().err
    assert "replaced 2 invalid UTF-8" in err and "latin1.txt" in err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["replaced_utf8"] == 2
    text = load_tokenizer(out / "tokenizer").hf.decode(_docs_of(out)[0][:-1].tolist())
    assert text == "caf\ufffd au lait, cr\ufffdme"
    for name, n in (("badjson", 1), ("nokey", 1)):
        out = tmp_path / name
        assert cli_main(["data", "prepare", str(tmp_path / "in" / f"{name}.jsonl"), "--out", str(out),
                         "--skip-bad", *tok]) == 0
        meta = json.loads((out / "meta.json").read_text())
        assert meta["skipped_bad"] == n and meta["splits"]["train"]["docs"] == 1
        assert "skipped 1 bad record" in capsys.readouterr().err


def test_cli_error_has_no_traceback(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    r = subprocess.run([sys.executable, "-m", "dropup", "data", "prepare", str(tmp_path / "bad.jsonl"),
                        "--out", str(tmp_path / "out"), "--vocab-size", "300"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"dropup data: error: {tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting value at column 1); "
        "fix the line or pass --skip-bad to skip such lines"]
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def _instruct_tokenizer(tokenizer_dir: Path, out: Path) -> Path:
    """The trained tokenizer dressed as an instruct model's: eos is the chat turn separator
    <|im_end|>, while <|endoftext|> stays a token of its own (as in SmolLM2-Instruct or Qwen)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf.add_special_tokens({"eos_token": "<|im_end|>"})
    hf.save_pretrained(out)
    return out


def test_eos_token_prefers_end_of_text_over_a_chat_separator(tmp_path, tokenizer_dir, capsys):
    inst = _instruct_tokenizer(tokenizer_dir, tmp_path / "instruct")
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    runs = {"default": [], "chosen": ["--eos-token", "<|im_end|>"]}
    metas = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert cli_main(["data", "prepare", str(src), "--out", str(out), "--tokenizer", str(inst),
                         "--val-fraction", "0", "--quiet", *extra]) == 0
        metas[name] = json.loads((out / "meta.json").read_text())
        ids = np.fromfile(out / "train.bin", dtype=metas[name]["dtype"])
        assert ids[-1] == metas[name]["eos_token_id"]  # every document ends with the chosen token
    vocab = load_tokenizer(inst).hf.get_vocab()
    assert metas["default"]["eos_token_id"] == vocab["<|endoftext|>"]
    assert metas["default"]["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert "chat turn separator" in metas["default"]["tokenizer"]["eos_choice"]
    assert metas["chosen"]["eos_token_id"] == vocab["<|im_end|>"]
    assert metas["chosen"]["tokenizer"]["eos_choice"] == "--eos-token"
    code = cli_main(["data", "prepare", str(src), "--out", str(tmp_path / "bad"), "--tokenizer", str(inst),
                     "--eos-token", "<nope>", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--eos-token '<nope>' is not a token" in err, err
