"""Token files checked when opened: meta.json's shape, the offsets file, and token ids against the
model's vocabulary (recorded by the writer, scanned for older datasets), each one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dropup.cli import main as cli_main
from dropup.data.tokens import TokenFile, write_dataset
from dropup.errors import UserError

DOCS = [[1 + (s + i) % 60 for i in range(60)] + [0] for s in range(20)]  # ids 0..60, 61 per document


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds") / "toy", {"train": DOCS, "val": DOCS[:4]}, 64,
                         eos_token_id=0)


def _copy(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "toy"))


def _edit_meta(ds: Path, edit) -> None:
    meta = json.loads((ds / "meta.json").read_text())
    meta = edit(meta) or meta
    (ds / "meta.json").write_text(json.dumps(meta))


def _forget_max(meta: dict) -> None:  # as written before max_token_id was recorded
    for split in meta["splits"].values():
        del split["max_token_id"]


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_the_writer_records_the_largest_id_and_older_datasets_are_scanned(tmp_path, dataset):
    f = TokenFile(dataset)
    assert f.meta["splits"]["train"]["max_token_id"] == 60 == f.max_token_id()
    f.check_vocab(61)
    with pytest.raises(UserError) as e:
        f.check_vocab(32)
    assert _one_line(e) == (f"{dataset / 'train.bin'} holds token id 60, but the model's vocabulary has 32 tokens "
                            "(ids 0 to 31); tokenise the data with the model's tokenizer")
    old = _copy(dataset, tmp_path)
    _edit_meta(old, _forget_max)
    TokenFile._SCAN = 7  # several chunks
    try:
        assert TokenFile(old).max_token_id() == 60 and TokenFile(old, "val").max_token_id() == 60
    finally:
        TokenFile._SCAN = 1 << 24
    empty = write_dataset(tmp_path / "empty", {"train": [[]]}, 64)
    assert TokenFile(empty).meta["splits"]["train"]["max_token_id"] is None and TokenFile(empty).max_token_id() is None


@pytest.mark.parametrize("edit, says", [
    (lambda m: [m], "it holds a JSON list, not an object"),
    (lambda m: m.pop("splits") and None, "it has no 'splits' object"),
    (lambda m: {**m, "splits": ["train"]}, "'splits' is a list, not an object"),
    (lambda m: {**m, "splits": {"train": 5}}, "split 'train' is a int, not an object"),
    (lambda m: m["splits"]["train"].pop("tokens") and None, "split 'train' has tokens None, not a count"),
    (lambda m: m["splits"]["train"].update(tokens="1220"), "split 'train' has tokens '1220', not a count"),
    (lambda m: m["splits"]["train"].update(docs=-1), "split 'train' has docs -1, not a count"),
    (lambda m: m.update(dtype="int8"), "dtype is 'int8', not uint16 or uint32"),
    (lambda m: m.update(vocab_size=0), "vocab_size is 0, not a positive integer"),
    (lambda m: m["splits"]["train"].update(max_token_id=64), "max_token_id 64, not an id below vocab_size 64"),
])  # fmt: skip
def test_a_meta_json_of_the_wrong_shape_is_one_line(tmp_path, dataset, edit, says):
    ds = _copy(dataset, tmp_path)
    _edit_meta(ds, edit)
    with pytest.raises(UserError) as e:
        TokenFile(ds)
    text = _one_line(e)
    assert text.startswith(f"{ds / 'meta.json'} is damaged: ") and says in text, text
    assert text.endswith("re-create the dataset with `dropup data prepare`"), text


def _cut(n: int):
    def cut(p: Path) -> None:
        p.write_bytes(p.read_bytes()[:n])

    return cut


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.unlink(), "train.offsets.npy is missing"),
    (_cut(-8), "train.offsets.npy is truncated or damaged (mmap length is greater than file size)"),
    (_cut(40), "train.offsets.npy is truncated or damaged (EOF: reading array header"),
    (lambda p: p.write_bytes(b""), "train.offsets.npy is truncated or damaged (No data left in file)"),
    (lambda p: np.save(p, np.arange(5)), "holds int64[5], not the int64[20 + 1] document starts"),
    (lambda p: np.save(p, np.arange(21) * 2), "does not span the 1220 tokens meta.json describes (from 0 to 40)"),
])  # fmt: skip
def test_a_missing_or_truncated_offsets_file_is_one_line(tmp_path, dataset, damage, says):
    ds = _copy(dataset, tmp_path)
    damage(ds / "train.offsets.npy")
    with pytest.raises(UserError) as e:
        TokenFile(ds)
    assert says in _one_line(e), str(e.value)


def test_the_trainer_refuses_token_ids_past_the_models_vocabulary(tmp_path, capsys, dataset):
    # An older dataset (no recorded max) whose meta.json understates its vocabulary: the preset's
    # vocabulary follows meta.json (32), and ids up to 60 would index past the embedding.
    ds = _copy(dataset, tmp_path)
    _edit_meta(ds, lambda m: _forget_max(m) or m.update(vocab_size=32))
    sets = ["model.preset=moe-tiny", f"data.datasets=[{{path: '{ds}'}}]", "data.seq_len=16", "batch.global_batch=2",
            "batch.micro_batch=2", "steps=1", "progress=false", f"out_dir={tmp_path / 'run'}"]
    code = cli_main(["train", "--config", "/dev/null", *[x for s in sets for x in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{ds / 'train.bin'} holds token id 60, but the model's vocabulary has 32 tokens" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
