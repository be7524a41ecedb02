"""The bytes behind bits per byte: ``data prepare`` records each split's exact UTF-8 bytes and a
per-token-id byte table whose sums give the bytes of any token window; datasets written before
the table get it from their tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dropup.data.prepare import PrepareOptions, load_tokenizer, prepare
from dropup.data.tokens import TOKEN_BYTES, TokenFile, token_byte_lengths

DOCS = ["plain ascii text, with punctuation.", "naïve café: 日本語 and 🙂 emoji",
        "  two leading spaces\r\nand a Windows line end"] + [f"document {i}: " + "word " * (i % 7 + 1)
                                                           for i in range(40)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tb")
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp / "ds"
    prepare(PrepareOptions(inputs=[str(src)], out=str(out), vocab_size=300, val_fraction=0.3, progress=False))
    return out


def _docs(f: TokenFile) -> list[np.ndarray]:
    return [np.asarray(f.tokens[f.offsets[i]:f.offsets[i + 1]], dtype=np.int64) for i in range(len(f.offsets) - 1)]


def test_prepare_records_exact_bytes_and_a_table_that_agrees_per_document(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["token_bytes"] == TOKEN_BYTES
    tok = load_tokenizer(dataset / "tokenizer")
    total = 0
    for split in ("train", "val"):
        f = TokenFile(dataset, split)
        table = f.token_bytes()
        info = meta["splits"][split]
        # the exact bytes: each document's text (decoded from its tokens, EOS dropped) in UTF-8
        texts = [tok.hf.decode(d[:-1].tolist()) for d in _docs(f)]
        assert all(t in DOCS for t in texts)
        assert info["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        # a byte-level BPE: the table's sum is exact for every document, EOS counting 0
        assert info["token_bytes"] == info["bytes"] == int(table[np.asarray(f.tokens, dtype=np.int64)].sum())
        assert info["token_bytes_mismatched_docs"] == 0
        assert table[meta["eos_token_id"]] == 0
        total += info["bytes"]
    assert total == sum(len(d.encode("utf-8")) for d in DOCS)


def test_a_dataset_written_before_the_table_gets_it_from_its_tokenizer(dataset, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    (old / TOKEN_BYTES).unlink()
    meta = json.loads((old / "meta.json").read_text())
    del meta["token_bytes"]
    for info in meta["splits"].values():
        for k in ("bytes", "token_bytes", "token_bytes_mismatched_docs"):
            del info[k]
    (old / "meta.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(TokenFile(old, "val").token_bytes(), TokenFile(dataset, "val").token_bytes())


def test_a_dataset_without_tokenizer_has_no_table(tmp_path):
    from dropup.data.tokens import write_dataset

    write_dataset(tmp_path / "d", {"train": [[1, 2, 3]]}, 8)
    assert TokenFile(tmp_path / "d").token_bytes() is None


def test_sentencepiece_pieces_count_the_space_and_byte_fallback_one_byte():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "\u2581hello": 2, "<0x41>": 3, "é": 4, "▁": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    assert token_byte_lengths(hf).tolist() == [0, 0, 6, 1, 2, 1]
