"""GGUF files as the dense source of `dropup upcycle` and `dropup train`: a tiny llama written here
with the gguf package (as llama.cpp's converter writes one: q/k rows permuted, a gpt2-style BPE
vocabulary in the metadata), compared with what transformers itself loads from the same file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import cli_fails, load_tensors
from dropup.cli import main
from dropup.hub import gguf as gguf_source
from dropup.hub.digest import sha256_file

gguf = pytest.importorskip("gguf")

H, F, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2  # widths: multiples of Q8_0's block of 32
TEXT = "hello world, the quick brown fox jumps over the lazy dog"


def _vocabulary() -> tuple[list[str], list[str], int]:
    """A byte-level BPE (GPT-2's scheme) trained on a sentence: tokens in id order, merges, and
    the id of its end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges, tokens.index("<|endoftext|>")


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q and k with the two rotary halves of each head interleaved (its RoPE
    pairs adjacent rows); transformers undoes this on load, so a faithful test file must do it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, qtype=None, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny llama GGUF: matrices quantised to ``qtype`` (None: F32), norms F32 as llama.cpp
    keeps them. Returns the float weights under their Hugging Face names (before permutation)."""
    tokens, merges, eot = _vocabulary()
    vocab, head_dim = len(tokens), H // HEADS
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i == eot else 1 for i in range(vocab)])  # 3: control token
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    weights = {}

    def tensor(gguf_name: str, hf_name: str, shape: tuple[int, ...], norm: bool = False, heads: int = 0):
        a = (1 + 0.2 * rng.standard_normal(shape) if norm else 0.1 * rng.standard_normal(shape)).astype(np.float32)
        weights[hf_name] = a
        if heads:
            a = _llama_cpp_permute(a, heads)
        if qtype is not None and a.ndim == 2:
            w.add_tensor(gguf_name, gguf.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, a)

    tensor("token_embd.weight", "model.embed_tokens.weight", (vocab, H))
    for i in range(LAYERS):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        tensor(b + "attn_norm.weight", p + "input_layernorm.weight", (H,), norm=True)
        tensor(b + "attn_q.weight", p + "self_attn.q_proj.weight", (H, H), heads=HEADS)
        tensor(b + "attn_k.weight", p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, H), heads=KV_HEADS)
        tensor(b + "attn_v.weight", p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, H))
        tensor(b + "attn_output.weight", p + "self_attn.o_proj.weight", (H, H))
        tensor(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,), norm=True)
        tensor(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (F, H))
        tensor(b + "ffn_up.weight", p + "mlp.up_proj.weight", (F, H))
        tensor(b + "ffn_down.weight", p + "mlp.down_proj.weight", (H, F))
    tensor("output_norm.weight", "model.norm.weight", (H,), norm=True)
    tensor("output.weight", "lm_head.weight", (vocab, H))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each GGUF alone in its directory (transformers reads a GGUF from a directory)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind, qtype in (("f32", None), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        (root / kind).mkdir()
        path = root / kind / f"tiny-{kind}.gguf"
        out[kind] = (path, write_tiny_gguf(path, qtype))
    return out


def _reference(path: Path):
    """transformers' own model and tokenizer from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _leftovers(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if "dropup-gguf" in p.name)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_upcycle_from_gguf_matches_transformers(tiny, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, weights = tiny[kind]
    out = tmp_path / "moe"
    assert main(["upcycle", str(path), str(out), "--method", "naive", "--num-experts", "4",
                 "--verify", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no dequantised copy left
    ref, ref_tok = _reference(path)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(tokens).logits, moe(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # The experts hold the dequantised dense FFN; q and k are back in Hugging Face's row order.
    moe_w = load_tensors(out)
    expert = moe_w["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    q = moe_w["model.layers.0.self_attn.q_proj.weight"]
    if kind == "f32":
        assert torch.equal(expert, torch.from_numpy(weights["model.layers.1.mlp.gate_proj.weight"]))
        assert torch.equal(q, torch.from_numpy(weights["model.layers.0.self_attn.q_proj.weight"]))
    else:  # quantised: near the float weights, not equal to them
        diff = (q - torch.from_numpy(weights["model.layers.0.self_attn.q_proj.weight"])).abs().max()
        assert 0 < diff < 0.01

    tok = AutoTokenizer.from_pretrained(out)
    assert tok(TEXT).input_ids == ref_tok(TEXT).input_ids
    assert tok.decode(tok(TEXT).input_ids) == TEXT
    assert tok.eos_token == "<|endoftext|>"

    record = json.loads((out / "upcycling.json").read_text())
    assert record["source"]["path"] == str(path.resolve())
    assert record["source"]["gguf"]["sha256"] == sha256_file(path)
    assert record["source"]["gguf"]["file_type"] == kind.upper()
    assert record["verify"]["matches_dense"]
    assert f'base_model: "{path.name}"' in (out / "README.md").read_text()


def test_train_from_gguf_init_exports_its_tokenizer(tiny, tmp_path):
    from transformers import AutoTokenizer

    from dropup.data.tokens import write_dataset

    path, _ = tiny["q8_0"]
    _, ref_tok = _reference(path)
    eos = ref_tok.eos_token_id
    docs = [ref_tok(f"{TEXT} {i}").input_ids + [eos] for i in range(40)]
    data = write_dataset(tmp_path / "data", {"train": docs, "val": docs[:4]}, len(ref_tok), eos_token_id=eos)
    cfg = {"model": {"init": str(path)},
           "data": {"datasets": [{"path": str(data)}], "seq_len": 16, "eval_batches": 1},
           "batch": {"global_batch": 4, "micro_batch": 2}, "steps": 2,
           "optim": {"lr": 1e-3, "warmup_steps": 1}, "log_interval": 1, "save_interval": 2,
           "progress": False, "device": "cpu", "precision": "fp32", "compile": False,
           "out_dir": str(tmp_path / "run")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "run") == []
    export = tmp_path / "run" / "ckpt" / "step_2" / "model"
    tok = AutoTokenizer.from_pretrained(export)
    assert tok(TEXT).input_ids == ref_tok(TEXT).input_ids
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == eos
    assert f"starting from `{path.name}`" in (export / "README.md").read_text()
    # The run names the GGUF, so that --resume sees the same model.init.
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["init"] == str(path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_failed_conversion_leaves_no_copy(tiny, tmp_path, capsys, monkeypatch):
    path, _ = tiny["f32"]
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep").write_text("x")
    # refused after dequantising: OUT is not empty
    cli_fails(capsys, ["upcycle", str(path), str(out), "--quiet"], "is not empty")
    assert _leftovers(tmp_path) == []

    # stopped while dequantising (Ctrl-C)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_source, "_save_tokenizer", interrupted)
    assert main(["upcycle", str(path), str(tmp_path / "other"), "--quiet"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_copy_of_a_killed_run_is_removed(tiny, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".moe.dropup-gguf-{dead.pid}-x1y2"
    (stale / "tiny.gguf").mkdir(parents=True)
    path, _ = tiny["f32"]
    with gguf_source.dense_source(path, beside=tmp_path / "moe") as local:
        assert not stale.exists()
        assert (local / "config.json").is_file() and local.name == path.name
        assert gguf_source.dequantised(path) == local
    assert _leftovers(tmp_path) == [] and gguf_source.dequantised(path) is None


def test_without_the_gguf_package_one_line(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    path, _ = tiny["f32"]
    line = cli_fails(capsys, ["upcycle", str(path), str(tmp_path / "moe")], "needs the gguf package")
    assert "pip install 'dropup[gguf]'" in line
    assert _leftovers(tmp_path) == []


def _gguf_of_arch(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files_one_line(tiny, tmp_path, capsys):
    good = tiny["q8_0"][0].read_bytes()
    cases = {"not-gguf.gguf": (b"PK\x03\x04 not a gguf" * 20, "is not a GGUF file"),
             "cut-in-metadata.gguf": (good[:200], "not a readable GGUF file"),
             "cut-in-tensors.gguf": (good[:-1000], "not a readable GGUF file")}
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        cli_fails(capsys, ["upcycle", str(tmp_path / name), str(tmp_path / "moe")], name, needle)
    # no .gguf suffix but the magic: still read as GGUF
    (tmp_path / "model.bin").write_bytes(good[:-1000])
    cli_fails(capsys, ["upcycle", str(tmp_path / "model.bin"), str(tmp_path / "moe")], "not a readable GGUF")
    cli_fails(capsys, ["upcycle", str(_gguf_of_arch(tmp_path / "g.gguf", "gpt2")), str(tmp_path / "moe")],
              "a GGUF of a gpt2 model", "dense llama")
    cli_fails(capsys, ["upcycle", str(_gguf_of_arch(tmp_path / "r.gguf", "rwkv6")), str(tmp_path / "moe")],
              "transformers cannot read this GGUF")
    # the same for training's model.init
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": {"init": str(tmp_path / "cut-in-tensors.gguf")}, "data": {"datasets": [{"path": "x"}]},
        "steps": 1, "out_dir": str(tmp_path / "run")}))
    cli_fails(capsys, ["train", "--config", str(tmp_path / "run.yaml")], "not a readable GGUF")
    assert not (tmp_path / "moe").exists() and _leftovers(tmp_path) == []
