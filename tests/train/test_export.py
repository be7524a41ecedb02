"""A training checkpoint's model/ export is a complete Hugging Face checkpoint: transformers loads
its tokenizer and model from the directory alone and generates with them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from dropup.data.prepare import train_tokenizer
from dropup.data.tokens import write_dataset
from dropup.train.config import load_config
from dropup.train.loop import train

TEXTS = [f"the {w} number {i} is followed by {i + 1}." for i in range(60) for w in ("first", "next", "last")]


def _dataset(root: Path, name: str) -> Path:
    ds = root / name
    tok = train_tokenizer(TEXTS, 300, ds / "tokenizer")
    eos = tok.hf.eos_token_id
    docs = [tok.hf.encode(t, add_special_tokens=False) + [eos] for t in TEXTS]
    sha = hashlib.sha256((ds / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    return write_dataset(ds, {"train": docs, "val": docs[:8]}, tok.vocab_size, eos_token_id=eos,
                         tokenizer={"path": "tokenizer", "sha256": sha, "eos_token": tok.hf.eos_token})


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = _dataset(root, "prose")
    cfg = {"model": {"preset": "moe-tiny"},
           "data": {"datasets": [{"path": str(data)}], "seq_len": 16, "eval_batches": 1},
           "batch": {"global_batch": 4, "micro_batch": 2}, "steps": 2,
           "optim": {"lr": 3e-3, "warmup_steps": 1}, "log_interval": 1, "eval_interval": 2,
           "save_interval": 2, "progress": False, "device": "cpu", "precision": "fp32",
           "compile": False, "out_dir": str(root / "run")}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(load_config(root / "run.yaml"))
    finally:
        torch.set_num_threads(threads)
    return run / "ckpt" / "step_2" / "model"


def test_export_loads_and_generates_with_transformers(export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"} <= {
        p.name for p in export.iterdir()}
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    ids = tok("the first number", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    assert out.shape == (1, ids.shape[1] + 3)
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id


def test_export_card_records_the_training(export):
    text = (export / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "drop-upcycling" in meta["tags"]
    assert "base_model" not in meta  # a preset: trained from a random initialisation
    assert "2 steps" in body and "random initialisation" in body
    tokens = json.loads((export.parent / "trainer.json").read_text())["tokens"]
    assert f"{tokens:,} tokens" in body


def test_manifest_covers_the_side_files(export):
    files = json.loads((export.parent / "manifest.json").read_text())["files"]
    assert {"model/README.md", "model/tokenizer.json", "model/generation_config.json"} <= set(files)
