"""`dropup generate`: an upcycled checkpoint with a tokenizer continues a prompt through
transformers; greedy output is the same every run; missing pieces are one line."""

from __future__ import annotations

import shutil

from conftest import build_dense, cli_fails

from dropup import upcycle
from dropup.cli import main
from dropup.data.prepare import train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog and runs far away"] * 30


def _moe_with_tokenizer(tmp_path):
    tok = train_tokenizer(TEXTS, 300, tmp_path / "tok")
    src = build_dense(tmp_path / "dense", "llama", vocab=tok.vocab_size)
    for f in (tmp_path / "tok").iterdir():  # a dense model as distributed: weights and its tokenizer
        shutil.copy(f, src / f.name)
    upcycle(src, tmp_path / "moe", method="drop", num_experts=4, progress=False)
    return tmp_path / "moe"


def test_generate_continues_the_prompt(tmp_path, capsys):
    moe = _moe_with_tokenizer(tmp_path)
    outs = []
    for _ in range(2):
        assert main(["generate", str(moe), "--prompt", "the quick brown", "--max-new-tokens", "5"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("the quick brown") and len(outs[0]) > len("the quick brown")
    assert main(["generate", str(moe), "--prompt", "the quick", "--max-new-tokens", "4", "--sample",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("the quick")


def test_generate_without_a_tokenizer_is_one_line(tmp_path, capsys):
    src = build_dense(tmp_path / "dense", "llama")
    cli_fails(capsys, ["generate", str(src), "--prompt", "hi"], "has no tokenizer files", "--tokenizer DIR")
    cli_fails(capsys, ["generate", str(tmp_path / "nothing"), "--prompt", "hi"], "no config.json")
