"""lm-evaluation-harness on dropup's datasets: the tasks write_tasks makes hold exactly the
prepared documents, and lm-eval's bits per byte on them equals a reference computed here from
transformers' own model, token by token."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dropup.analysis import harness
from dropup.data.prepare import PrepareOptions, load_tokenizer, prepare
from dropup.data.tokens import TokenFile, TokenWriter, write_dataset
from dropup.errors import UserError
from conftest import build_dense

PROSE = [f"Paragraph {i}: the expert number {i % 8} reads tokens, and “quotes” café {i * 3}.\n"
         + " ".join(f"w{(i * 5 + j) % 23}" for j in range(i % 9 + 3)) for i in range(24)]
CODE = [f"def f{i}(x):\n    return x * {i} + {i % 5}  # ünï\n\tpass\n" for i in range(24)]


def _prep(root: Path, name: str, docs: list[str], **kw) -> Path:
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(PrepareOptions(inputs=[str(src)], out=str(root / name), domain=name, val_fraction=0.4, seed=1,
                           threads=1, progress=False, **kw))
    return root / name


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("harness")
    prose = _prep(root, "prose", PROSE, vocab_size=300)
    code = _prep(root, "code", CODE, tokenizer=str(prose / "tokenizer"))
    tok = load_tokenizer(prose / "tokenizer")
    # max_position_embeddings 256 (build_dense): lm-eval's window, longer than every document
    model = build_dense(root / "model", "llama", vocab=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=None)
    tok.hf.save_pretrained(model)
    tasks_dir = root / "tasks"
    names = harness.write_tasks(tasks_dir, [prose, code])
    return {"root": root, "data": {"prose": prose, "code": code}, "model": model, "tasks": tasks_dir,
            "names": names, "tok": tok}


def _jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_tasks_hold_the_prepared_documents(setup):
    assert setup["names"] == ["dropup_prose", "dropup_code"]
    tok = setup["tok"]
    for name, ds in setup["data"].items():
        task = setup["tasks"] / f"dropup_{name}.yaml"
        cfg = yaml.safe_load(task.read_text())
        data_file = Path(cfg["dataset_kwargs"]["data_files"]["val"])
        assert data_file.is_absolute() and data_file == (setup["tasks"] / f"dropup_{name}.jsonl").resolve()
        assert cfg["output_type"] == "loglikelihood_rolling" and cfg["test_split"] == "val"
        texts = _jsonl(data_file)
        f = TokenFile(ds, "val")
        docs = [f.tokens[f.offsets[i] : f.offsets[i + 1]].tolist() for i in range(len(f.offsets) - 1)]
        assert len(texts) == len(docs) == cfg["metadata"]["docs"] >= 3
        source = PROSE if name == "prose" else CODE
        for text, ids in zip(texts, docs):
            assert ids[-1] == tok.eos_id
            assert tok.hf.encode(text, add_special_tokens=False) == ids[:-1]  # the same token ids
            assert text in source  # the exact source text, EOS left out
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        assert cfg["metadata"]["bytes"] == n_bytes and cfg["metadata"]["roundtrip_mismatches"] == 0
        assert cfg["metadata"]["tokens"] == f.info["tokens"] - len(docs)
        if "bytes" in f.info:  # recorded by data prepare (newer datasets)
            assert f.info["bytes"] == n_bytes
    group = yaml.safe_load((setup["tasks"] / "dropup.yaml").read_text())
    assert group["group"] == "dropup" and group["task"] == setup["names"]


def _reference_nll(model, texts: list[str], tokenizer, prefix: int) -> float:
    """Sum over documents of -log p(token | prefix, earlier tokens), every token of each text."""
    total = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text)  # as lm-eval encodes (default special tokens: none here)
            x = torch.tensor([[prefix] + ids[:-1]])
            logp = torch.log_softmax(model(x).logits.double(), -1)[0]
            total -= logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    return total


def test_lm_eval_bits_per_byte_match_the_reference(setup):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra dropup[eval]")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = harness.run_lm_eval(setup["model"], ["dropup"], include_path=setup["tasks"], batch_size=4)
    table = harness.format_table(results)
    assert "dropup_prose" in table and "bits_per_byte" in table

    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    # lm-eval conditions a document's first token on the tokenizer's BOS, else its EOS
    assert tokenizer.bos_token_id is None
    prefix = tokenizer.eos_token_id
    macro = []
    for name in setup["names"]:
        texts = _jsonl(setup["tasks"] / f"{name}.jsonl")
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        assert max(len(tokenizer.encode(t)) for t in texts) < 256  # one window per document
        expect = _reference_nll(model, texts, tokenizer, prefix) / (math.log(2) * n_bytes)
        got = harness.bits_per_byte(results, name)
        # Same fp32 weights and the same tokens scored: only batching (padding) and the order of
        # the float32 sums differ (~1e-8 relative seen). A first token conditioned on anything else
        # moves the result by far more than the tolerance (checked below).
        assert got == pytest.approx(expect, rel=1e-6)
        other = _reference_nll(model, texts, tokenizer, prefix=prefix + 1) / (math.log(2) * n_bytes)
        assert abs(other - expect) > 100 * 1e-6 * expect
        macro.append(expect)
    group = results["groups"]["dropup"]["bits_per_byte,none"]
    assert group == pytest.approx(sum(macro) / len(macro), rel=1e-6)  # the macro average


def test_limit_caps_the_documents(setup):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra dropup[eval]")
    results = harness.run_lm_eval(setup["model"], "dropup_code, dropup_p*", include_path=setup["tasks"], limit=2)
    assert {k: v["effective"] for k, v in results["n-samples"].items()} == {"dropup_code": 2, "dropup_prose": 2}
    back = json.loads(harness.to_json(results))
    assert back["results"]["dropup_code"]["bits_per_byte,none"] == harness.bits_per_byte(results, "dropup_code")


def test_max_docs_and_names(setup, tmp_path):
    names = harness.write_tasks(tmp_path / "t", [setup["data"]["code"]], max_docs=2, names=["My Code-1"],
                                group=None)
    assert names == ["dropup_my_code_1"]
    assert len(_jsonl(tmp_path / "t" / "dropup_my_code_1.jsonl")) == 2
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["dropup_my_code_1.jsonl", "dropup_my_code_1.yaml"]


def test_write_tasks_bad_input(setup, tmp_path):
    prose = setup["data"]["prose"]
    with pytest.raises(UserError, match="distinct names"):
        harness.write_tasks(tmp_path / "a", [prose, prose])
    with pytest.raises(UserError, match="one name per dataset"):
        harness.write_tasks(tmp_path / "a", [prose], names=["a", "b"])
    with pytest.raises(UserError, match="no 'test' split"):
        harness.write_tasks(tmp_path / "a", [prose], split="test")
    with pytest.raises(UserError, match="group name 'a b'"):
        harness.write_tasks(tmp_path / "a", [prose], group="a b")
    with TokenWriter(tmp_path / "empty", vocab_size=10, eos_token_id=0) as w:
        w.add([1, 0], "train")
        w.add_batch(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), "val")  # a val split, empty
    empty = tmp_path / "empty"
    with pytest.raises(UserError, match="no documents in its 'val' split"):
        harness.write_tasks(tmp_path / "a", [empty])
    bare = write_dataset(tmp_path / "bare", {"val": [[1, 2, 0]]}, 10, eos_token_id=0)
    with pytest.raises(UserError, match="no tokenizer directory"):
        harness.write_tasks(tmp_path / "a", [bare])
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(UserError, match="not empty"):
        harness.write_tasks(setup["tasks"], [prose])


def test_run_lm_eval_bad_input(setup, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        harness.run_lm_eval(tmp_path, ["dropup_prose"])
    with pytest.raises(UserError, match="no lm-eval tasks"):
        harness.run_lm_eval(setup["model"], " , ")
    with pytest.raises(UserError, match="--dtype 'float8' is not one of"):
        harness.run_lm_eval(setup["model"], ["dropup_prose"], dtype="float8")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'dropup\[eval\]'"):
        harness.run_lm_eval(setup["model"], ["dropup_prose"], include_path=setup["tasks"])


@pytest.mark.slow  # the unknown name is looked up in lm-eval's own index too, which takes ~10 s to build
def test_unknown_task(setup):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra dropup[eval]")
    with pytest.raises(UserError, match="unknown lm-eval task 'dropup_nope'"):
        harness.run_lm_eval(setup["model"], ["dropup_nope"], include_path=setup["tasks"])


def test_dropup_eval_and_lm_eval_agree_through_the_cli(setup, tmp_path, capsys):
    """`dropup eval --write-lm-eval-tasks` then `--lm-eval`: lm-eval's bits per byte on the tasks
    agrees with `dropup eval`'s own on the same val documents. Not exactly: dropup scores the
    packed split (each document's EOS is a target and its first token sees the previous document)
    while lm-eval scores each document alone without its EOS (see dropup.analysis.evaluate); on
    this tiny random model with ~80-byte documents that is about 1% of the total, so 3%. A byte
    count off by a factor (tokens for bytes, EOS counted as text) would miss by far more."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra dropup[eval]")
    from dropup.analysis.evaluate import EvalOptions, evaluate
    from dropup.cli import main

    data = [str(setup["data"]["prose"]), str(setup["data"]["code"])]
    tasks = tmp_path / "tasks"
    assert main(["eval", "--write-lm-eval-tasks", str(tasks), "--data", *data]) == 0
    assert "dropup_prose, dropup_code" in capsys.readouterr().out
    out = tmp_path / "lm"
    assert main(["eval", str(setup["model"]), "--lm-eval", "dropup", "--lm-eval-include", str(tasks),
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "bits_per_byte" in capsys.readouterr().out
    lm = json.loads((out / "lm_eval.json").read_text())
    ours = evaluate(EvalOptions([str(setup["model"])], data, device="cpu", progress=False))["models"][0]
    for name in ("prose", "code"):
        theirs = lm["results"][f"dropup_{name}"]["bits_per_byte,none"]
        assert ours["datasets"][name]["bpb"] == pytest.approx(theirs, rel=0.03), name
    # the task files alone need no checkpoint; a checkpoint without --lm-eval is a one-line error
    assert main(["eval", str(setup["model"]), "--write-lm-eval-tasks", str(tmp_path / "t2"), "--data", *data]) == 2
    assert "add --lm-eval dropup" in capsys.readouterr().err and not (tmp_path / "t2").exists()
    assert main(["eval", "--lm-eval", "dropup"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err
