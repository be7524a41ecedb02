"""`dropup eval`: loss and bits per byte equal a hand computation with transformers' logits and
the text's UTF-8 bytes, every token is scored once, a run directory gives a curve in step order,
eval.json and the table, and bad input (one line, exit 2, nothing in OUT)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import build_dense, cli_fails
from dropup.analysis.evaluate import EvalOptions, evaluate, windows
from dropup.cli import main
from dropup.data.prepare import PrepareOptions, load_tokenizer, prepare
from dropup.data.tokens import TokenFile, write_dataset

PROSE = ["The café served naïve tea at noon.", "A quick brown fox jumps over the lazy dog."] + [
    f"sentence {i} of the prose domain, with a few words." for i in range(30)]
CODE = [f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(30)]
CPU = dict(device="cpu", progress=False)


def _prepare(tmp: Path, name: str, docs: list[str], **kw) -> Path:
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(PrepareOptions(inputs=[str(src)], out=str(tmp / name), val_fraction=0.3, progress=False, **kw))
    return tmp / name


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from dropup import upcycle

    tmp = tmp_path_factory.mktemp("eval")
    prose = _prepare(tmp, "prose", PROSE, vocab_size=300)
    code = _prepare(tmp, "code", CODE, tokenizer=str(prose / "tokenizer"))
    vocab = json.loads((prose / "meta.json").read_text())["vocab_size"]
    dense = build_dense(tmp / "dense", "llama", vocab=vocab)
    for f in (prose / "tokenizer").iterdir():
        if f.name != "config.json":
            shutil.copy(f, dense / f.name)
    moe = tmp / "moe"
    upcycle(dense, moe, num_experts=4, top_k=2, ratio=0.5, progress=False)
    # MoE in layer 1 only, layer 0 keeps the dense FFN (a Qwen3-MoE's mlp_only_layers)
    mixed = tmp / "mixed"
    upcycle(dense, mixed, target="qwen3_moe", moe_layers="1", num_experts=4, top_k=2, ratio=0.5, progress=False)
    return {"tmp": tmp, "prose": prose, "code": code, "dense": dense, "moe": moe, "mixed": mixed, "vocab": vocab}


def _hand(model_dir: Path, dataset: Path, seq_len: int) -> tuple[float, int, int]:
    """(summed NLL, tokens, bytes) by transformers' logits over the val stream's windows, the bytes
    from the documents' text in UTF-8 minus the stream's first token (never a target)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stream = torch.from_numpy(np.asarray(TokenFile(dataset, "val").tokens, dtype=np.int64))
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            w = stream[start:start + seq_len + 1]
            logits = hf(w[None, :-1]).logits[0].double()
            nll += float(-logits.log_softmax(-1).gather(1, w[1:, None]).sum())
            n += len(w) - 1
    tok = load_tokenizer(dataset / "tokenizer")
    f = TokenFile(dataset, "val")
    texts = [tok.hf.decode(f.tokens[f.offsets[d]:f.offsets[d + 1] - 1].tolist()) for d in range(len(f.offsets) - 1)]
    first = tok.hf.convert_tokens_to_string(tok.hf.convert_ids_to_tokens([int(stream[0])]))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts) - len(first.encode("utf-8"))
    return nll, n, n_bytes


@pytest.mark.parametrize("which", ["dense", "moe", "mixed"])
def test_loss_and_bits_per_byte_equal_a_hand_computation(setup, which):
    report = evaluate(EvalOptions([str(setup[which])], [str(setup["prose"])], seq_len=16, batch_size=3, **CPU))
    got = report["models"][0]["datasets"]["prose"]
    nll, n, n_bytes = _hand(setup[which], setup["prose"], 16)
    assert got["tokens"] == n == len(TokenFile(setup["prose"], "val")) - 1
    assert got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["bpb"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)


@pytest.mark.parametrize("seq_len,tokens", [(5, None), (7, None), (16, 40), (16, 33), (100, None), (3, 2)])
def test_every_token_is_scored_exactly_once(setup, seq_len, tokens):
    f = TokenFile(setup["prose"], "val")
    n = len(f) if tokens is None else tokens
    targets = torch.cat([b[:, 1:].flatten() for b in windows(f, seq_len, n, batch_size=2)])
    np.testing.assert_array_equal(targets.numpy(), np.asarray(f.tokens[1:n], dtype=np.int64))
    report = evaluate(EvalOptions([str(setup["dense"])], [str(setup["prose"])], seq_len=seq_len, tokens=tokens, **CPU))
    assert report["models"][0]["datasets"]["prose"]["tokens"] == n - 1


def test_batch_size_and_dtype_leave_the_numbers_alone(setup):
    def run(**kw):
        return evaluate(EvalOptions([str(setup["moe"])], [str(setup["prose"])], seq_len=8, **CPU, **kw)
                        )["models"][0]["datasets"]["prose"]

    a, b, c = run(batch_size=1), run(batch_size=5), run(dtype="bfloat16")
    assert a["tokens"] == b["tokens"] == c["tokens"] and a["bytes"] == b["bytes"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert c["loss"] == pytest.approx(a["loss"], rel=0.05)  # bf16 weights: close, not equal


@pytest.fixture(scope="module")
def run_dir(setup) -> Path:
    from dropup.train.config import load_config
    from dropup.train.loop import train

    root = setup["tmp"]
    cfg = {"model": {"init": str(setup["moe"])},
           "data": {"datasets": [{"path": str(setup["prose"])}, {"path": str(setup["code"])}], "seq_len": 16,
                    "eval_batches": 1},
           "batch": {"global_batch": 2, "micro_batch": 2}, "steps": 3,
           "optim": {"lr": 3e-3, "warmup_steps": 1}, "log_interval": 1, "eval_interval": 1,
           "save_interval": 1, "keep_last": 3, "progress": False, "device": "cpu", "precision": "fp32",
           "compile": False, "out_dir": str(root / "run")}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(root / "run.yaml"))
    finally:
        torch.set_num_threads(threads)


def test_a_run_directory_is_a_curve_in_step_order_with_a_plot(setup, run_dir, tmp_path):
    out = tmp_path / "out"
    report = evaluate(EvalOptions([str(run_dir)], [str(setup["prose"]), str(setup["code"])], seq_len=16,
                                  out=str(out), **CPU))
    models = report["models"]
    assert [m["step"] for m in models] == [1, 2, 3]
    assert [m["tokens_trained"] for m in models] == [32, 64, 96]
    assert all(m["run"] == str(run_dir) for m in models)
    assert [m["checkpoint"] for m in models] == [str(run_dir / "ckpt" / f"step_{s}" / "model") for s in (1, 2, 3)]
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(report))
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # training lowers the training data's loss: the curve is the run's, not three copies
    assert models[-1]["datasets"]["prose"]["loss"] != models[0]["datasets"]["prose"]["loss"]


def test_eval_json_schema_and_the_cli_table(setup, capsys, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", str(setup["dense"]), str(setup["moe"]), "--data", str(setup["prose"]), str(setup["code"]),
            "--seq-len", "16", "--device", "cpu", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for needle in ("prose", "code", "macro", "bits per byte", "dense", "moe"):
        assert needle in table
    report = json.loads((out / "eval.json").read_text())
    assert report["format"] == "dropup-eval" and report["version"] == 1 and report["split"] == "val"
    assert report["options"]["device"] == "cpu" and report["options"]["dtype"] == "float32"
    assert set(report["datasets"]) == {"prose", "code"}
    assert report["datasets"]["code"]["tokens_read"] == len(TokenFile(setup["code"], "val"))
    assert [m["checkpoint"] for m in report["models"]] == [str(setup["dense"]), str(setup["moe"])]
    for m in report["models"]:
        assert m["step"] is None and m["run"] is None and m["seq_len"] == 16
        for d in ("prose", "code"):
            s = m["datasets"][d]
            assert set(s) == {"loss", "perplexity", "bpb", "tokens", "bytes"}
            assert s["bytes"] > s["tokens"] > 0 and math.isfinite(s["bpb"])
            assert f"{s['loss']:.4f}" in table
        assert m["macro"]["loss"] == pytest.approx((m["datasets"]["prose"]["loss"] + m["datasets"]["code"]["loss"]) / 2)
        assert m["macro"]["bpb"] == pytest.approx((m["datasets"]["prose"]["bpb"] + m["datasets"]["code"]["bpb"]) / 2)
        assert f"{m['macro']['loss']:.4f}" in table
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == report["models"]
    assert not (out / "loss.png").exists()  # no run directory, no curve


def test_default_seq_len_is_the_models_context(setup):
    report = evaluate(EvalOptions([str(setup["dense"])], [str(setup["prose"])], **CPU))
    assert report["models"][0]["seq_len"] == 256  # build_dense's max_position_embeddings


# ---- bad input ----------------------------------------------------------------------------------


def _fails(capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    cli_fails(capsys, ["eval", *argv, "--device", "cpu", "--quiet", "--out", str(out)], *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_dataset_of_another_tokenizer_is_refused_unless_allowed(setup, capsys, tmp_path):
    other = _prepare(tmp_path, "other", [t.upper() + " extra words here" for t in PROSE],
                     vocab_size=setup["vocab"])
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(other)], "different tokenizer",
           "--allow-tokenizer-mismatch")
    assert main(["eval", str(setup["dense"]), "--data", str(other), "--device", "cpu", "--quiet", "--seq-len", "8",
                 "--allow-tokenizer-mismatch"]) == 0


def test_token_ids_past_the_models_vocabulary(setup, capsys, tmp_path):
    big = write_dataset(tmp_path / "big", {"train": [[1, 2]], "val": [[1, setup["vocab"] + 5, 3]]},
                        setup["vocab"] + 10)
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(big)], f"token id {setup['vocab'] + 5}",
           "vocabulary")


def test_too_few_tokens(setup, capsys, tmp_path):
    n = len(TokenFile(setup["prose"], "val"))
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(setup["prose"]), "--tokens", str(n + 1)],
           f"has {n} tokens", f"--tokens {n + 1}")
    one = write_dataset(tmp_path / "one", {"train": [[1, 2]], "val": [[1]]}, setup["vocab"])
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(one)], "has 1 tokens")
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(setup["prose"]), "--tokens", "1"], "--tokens")


def test_a_missing_split(setup, capsys, tmp_path):
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(setup["prose"]), "--split", "test"],
           "no 'test' split", "--split")


def test_an_empty_run_directory_and_a_path_that_is_not_a_checkpoint(setup, capsys, tmp_path):
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 1\n")
    _fails(capsys, tmp_path, [str(run), "--data", str(setup["prose"])], "no ckpt/step_N/model")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    _fails(capsys, tmp_path, [str(nothing), "--data", str(setup["prose"])], "is neither a Hugging Face checkpoint")
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(nothing)], "meta.json")


def test_a_seq_len_past_the_models_context(setup, capsys, tmp_path):
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(setup["prose"]), "--seq-len", "257"],
           "max_position_embeddings 256")


def test_a_dataset_prepared_before_the_byte_table_still_gets_bits_per_byte(setup, tmp_path):
    old = tmp_path / "prose"
    shutil.copytree(setup["prose"], old)
    (old / "token_bytes.npy").unlink()
    meta = json.loads((old / "meta.json").read_text())
    del meta["token_bytes"]
    (old / "meta.json").write_text(json.dumps(meta))

    def bpb(ds):
        return evaluate(EvalOptions([str(setup["dense"])], [str(ds)], seq_len=16, **CPU)
                        )["models"][0]["datasets"]["prose"]["bpb"]

    assert bpb(old) == bpb(setup["prose"]) is not None


def test_options_out_of_range_and_a_missing_gpu(setup, capsys, tmp_path, monkeypatch):
    _fails(capsys, tmp_path, [str(setup["dense"]), "--data", str(setup["prose"]), "--batch-size", "0"],
           "--batch-size must be >= 1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    cli_fails(capsys, ["eval", str(setup["dense"]), "--data", str(setup["prose"]), "--device", "cuda",
                       "--out", str(out)], "no CUDA GPU")
    assert not out.exists()
