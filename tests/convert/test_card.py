"""Model cards and the tokenizer check of a run: the card's front matter is YAML the Hub reads,
the converter writes one that names no path of the machine, and tokenizers that disagree are
refused."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import yaml

from dropup import upcycle
from dropup.data.tokens import write_dataset
from dropup.errors import UserError
from dropup.hub import card
from dropup.hub.synthetic import llama_config, write_synthetic_dense

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)


def _front(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_card_front_matter_is_hub_yaml():
    info = {"model_type": "mixtral", "layers": 2, "num_experts": 8, "top_k": 2, "total_params": 1000,
            "active_params": 400, "base_model": 'org/we"ird: name',
            "upcycling": {"method": "drop", "ratio": 0.5, "seed": 3, "num_experts": 8, "source": "org/x"},
            "training": {"steps": 10, "tokens": 12345, "init": "moe-init"}}
    meta, body = _front(card.model_card(info))
    assert meta == {"library_name": "transformers", "tags": list(card.TAGS), "base_model": 'org/we"ird: name',
                    "pipeline_tag": "text-generation"}
    assert "8 per layer, top-2" in body and "seed: 3" in body and "12,345 tokens" in body
    assert card.model_card(info) == card.model_card(dict(info))
    meta, _ = _front(card.model_card({**info, "base_model": None, "upcycling": None, "training": None}))
    assert "base_model" not in meta


def test_model_name_is_a_name_never_a_path(tmp_path):
    assert card.model_name(tmp_path / "my-dense") == "my-dense"
    snap = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc123"
    assert card.model_name(snap) == "meta-llama/Llama-3.2-1B"
    assert card.model_name(None) is None


def test_converter_writes_the_card(tmp_path):
    src = write_synthetic_dense(tmp_path / "dense-src", llama_config(**SMALL))
    a, b = tmp_path / "a" / "moe", tmp_path / "b" / "moe"
    upcycle(src, a, num_experts=4, top_k=1, ratio=0.25, seed=7, progress=False)
    upcycle(src, b, num_experts=4, top_k=1, ratio=0.25, seed=7, progress=False)
    text = (a / "README.md").read_text()
    assert text == (b / "README.md").read_text()  # reproducible: nothing of the machine or the time
    assert str(tmp_path) not in text
    meta, body = _front(text)
    assert meta["base_model"] == "dense-src" and "mixture-of-experts" in meta["tags"]
    assert "method `drop`" in body and "ratio: 0.25" in body and "seed: 7" in body
    assert "4 per layer, top-1 routing" in body
    # total parameters are those of the safetensors; each token uses 1 of 4 experts
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert f"({total:,}) total" in body
    expert = 3 * SMALL["hidden_size"] * SMALL["intermediate_size"]
    active = total - 2 * 4 * expert + 2 * expert
    assert f"({active:,}) active" in body


def _tokenizer(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(text)
    (path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}\n')
    return path


def _dataset(root: Path, tok_text: str | None) -> Path:
    meta = {}
    if tok_text is not None:
        _tokenizer(root / "tokenizer", tok_text)
        meta["tokenizer"] = {"path": "tokenizer", "sha256": hashlib.sha256(tok_text.encode()).hexdigest()}
    return write_dataset(root, {"train": [[1, 2, 0]]}, 8, eos_token_id=0, **meta)


def test_init_and_dataset_tokenizers_must_agree(tmp_path):
    init = _tokenizer(tmp_path / "init", '{"a": 1}')
    same, other, none = (_dataset(tmp_path / "same", '{"a": 1}'), _dataset(tmp_path / "other", '{"b": 2}'),
                         _dataset(tmp_path / "none", None))
    assert card.check_tokenizers(init, [same, none]) == init
    assert card.check_tokenizers(None, [none, same]) == same / "tokenizer"
    assert card.check_tokenizers(None, [none]) is None
    with pytest.raises(UserError, match="different tokenizer from the datasets"):
        card.check_tokenizers(init, [other])
    with pytest.raises(UserError, match="different tokenizers"):
        card.check_tokenizers(None, [same, other])
    with pytest.raises(UserError, match="different tokenizers"):
        card.run_tokenizer({"model": {"init": None}, "data": {"datasets": [{"path": str(same)}, {"path": str(other)}]}})
    # the same vocabulary saved with other formatting (transformers rewrites tokenizer.json when
    # `data prepare --tokenizer INIT` saves it) is the same tokenizer, not a mismatch
    from dropup.data.prepare import train_tokenizer

    real = tmp_path / "real"
    train_tokenizer(["some text to learn a few merges from, again and again"] * 20, 300, real)
    reformatted = tmp_path / "reformatted" / "tokenizer"
    reformatted.mkdir(parents=True)
    for f in real.iterdir():
        (reformatted / f.name).write_bytes(f.read_bytes())
    (reformatted / "tokenizer.json").write_text(json.dumps(json.loads((real / "tokenizer.json").read_text())))
    write_dataset(reformatted.parent, {"train": [[1, 2, 0]]}, 300, eos_token_id=0,
                  tokenizer={"path": "tokenizer", "sha256": "not-the-init-one"})
    assert card.check_tokenizers(real, [reformatted.parent]) == real
    # an init without a tokenizer (only its config) takes the datasets'
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer_config.json").write_text("{}")
    assert card.check_tokenizers(bare, [other]) == other / "tokenizer"


def test_generation_config_from_config_tokenizer_or_data(tmp_path):
    tok = _tokenizer(tmp_path / "tok", json.dumps({"added_tokens": [{"id": 5, "content": "</s>"}]}))
    assert card.generation_config({"bos_token_id": 1, "eos_token_id": 2}, tok) == {"bos_token_id": 1, "eos_token_id": 2}
    assert card.generation_config({}, tok) == {"eos_token_id": 5}
    assert card.generation_config({}, None, eos_token_id=0) == {"eos_token_id": 0}
    out = tmp_path / "out"
    out.mkdir()
    init = tmp_path / "init"
    init.mkdir()
    (init / "generation_config.json").write_text('{"eos_token_id": 9, "temperature": 0.7}\n')
    written = card.copy_tokenizer_files(tok, init, out, {})
    assert set(written) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7
