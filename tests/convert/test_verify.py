"""`--verify` streams the depth through transformers and reports what a conversion costs.

The streamed forward must equal transformers' own full model (so the numbers are transformers'),
exact methods must report zero change, the others a measured change with the reason, and a bad
``--verify-text`` must fail before anything is converted."""

from __future__ import annotations

import gc
import shutil
import weakref

import pytest
import torch
from conftest import build_dense, cli_fails

from dropup import upcycle
from dropup.cli import main
from dropup.convert import verify as v
from dropup.data.prepare import train_tokenizer

TEXT = ("the quick brown fox jumps over the lazy dog and runs far away into the green hills, "
        "where it finds a small river and drinks from it before the sun goes down. ") * 20


@pytest.mark.parametrize("arch,target", [("mistral", "mixtral"), ("qwen2", "qwen2_moe"),
                                         ("qwen3", "qwen3_moe"), ("llama", "mixtral"),
                                         ("granite", "granitemoe")])
def test_streamed_forward_equals_transformers_full_model(dense_models, tmp_path, arch, target):
    from transformers import AutoModelForCausalLM

    # drop r = 0.5: the experts differ, so routing and every expert matter to the logits;
    # mistral's sliding window (8) is shorter than the windows (128), so the mask matters too.
    upcycle(dense_models[arch], tmp_path / "moe", method="drop", ratio=0.5, target=target, progress=False)
    tokens = v.random_windows(96, seed=1)
    for path in (dense_models[arch], tmp_path / "moe"):
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            want = full(tokens).logits
        got = v._StreamedModel(path, "test").logits(tokens, lambda: None)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_only_one_layer_is_in_memory_at_a_time(dense_models, tmp_path, monkeypatch):
    upcycle(dense_models["llama"], tmp_path / "moe", method="naive", progress=False)
    built = []
    original = v._StreamedModel._layer_model

    def tracked(self, i):
        gc.collect()
        alive = sum(r() is not None for r in built)
        assert alive == 0, f"{alive} layer models still alive when layer {i} is built"
        model = original(self, i)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(v._StreamedModel, "_layer_model", tracked)
    report = v.verify(dense_models["llama"], tmp_path / "moe")
    assert len(built) == 2 * 2  # two layers of the MoE, then two of the dense model
    assert report["exact"] and report["matches_dense"]


@pytest.mark.parametrize("method,ratio", [("naive", 0.5), ("drop", 0.0), ("noise", 0.0)])
def test_exact_methods_report_no_change(dense_models, tmp_path, method, ratio):
    prov = upcycle(dense_models["qwen3"], tmp_path / "moe", method=method, ratio=ratio, verify=True,
                   progress=False)
    r = prov["verify"]
    assert r["exact"] and r["matches_dense"] and "not_exact_because" not in r
    assert r["max_abs_logit_diff"] < 1e-4 and abs(r["loss_change"]) < 1e-4
    assert r["windows"] == [v.RANDOM_WINDOWS, v.WINDOW + 1] and r["tokens"] == "random tokens"


def test_inexact_conversions_say_why_and_by_how_much(dense_models, tmp_path):
    drop = upcycle(dense_models["llama"], tmp_path / "drop", method="drop", ratio=0.5, verify=True,
                   progress=False)["verify"]
    assert not drop["exact"] and "matches_dense" not in drop
    assert drop["not_exact_because"] == "method drop re-draws r = 0.5 of each expert's neurons at random"
    assert drop["max_abs_logit_diff"] > 1e-2
    assert drop["loss_change"] == pytest.approx(drop["moe_loss"] - drop["dense_loss"], abs=2e-5)
    qk = upcycle(dense_models["llama"], tmp_path / "qk", method="naive", target="qwen3_moe", verify=True,
                 progress=False)["verify"]
    assert not qk["exact"] and "qwen3_moe normalises queries and keys" in qk["not_exact_because"]
    assert "llama source" in qk["not_exact_because"] and qk["max_abs_logit_diff"] > 1e-2
    for name in ("scratch", "btx"):  # every method has its reason in the methods table
        from dropup.convert.methods import METHODS

        assert METHODS[name].changes


def _dense_with_tokenizer(tmp_path):
    tok = train_tokenizer([TEXT] * 5, 300, tmp_path / "tok")
    src = build_dense(tmp_path / "dense", "llama", vocab=tok.vocab_size)
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, src / f.name)
    return src, tok


def test_verify_text_compares_on_the_files_tokens(tmp_path, capsys):
    src, _ = _dense_with_tokenizer(tmp_path)
    text = tmp_path / "sample.txt"
    text.write_text(TEXT)
    assert main(["upcycle", str(src), str(tmp_path / "moe"), "--method", "naive", "--num-experts", "4",
                 "--verify-text", str(text)]) == 0
    out = capsys.readouterr().out
    assert "of text of sample.txt" in out and "max logit difference" in out and "exact (" in out
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(src)(TEXT, add_special_tokens=False)["input_ids"]
    windows = v.text_windows(text, src)
    assert windows.shape[1] == v.WINDOW + 1 and windows[0].tolist() == ids[: v.WINDOW + 1]
    assert windows[1].tolist() == ids[v.WINDOW : 2 * v.WINDOW + 1]  # every prediction scored once

    import json

    prov = json.loads((tmp_path / "moe" / "upcycling.json").read_text())
    assert prov["verify"]["tokens"] == "text of sample.txt" and prov["verify"]["exact"]
    assert 0 < prov["verify"]["dense_loss"] < 20


def test_bad_verify_text_fails_before_converting(dense_models, tmp_path, capsys):
    src, _ = _dense_with_tokenizer(tmp_path)
    out = tmp_path / "moe"
    cli_fails(capsys, ["upcycle", str(src), str(out), "--verify-text", str(tmp_path / "nope.txt")],
              "is not a file")
    short = tmp_path / "short.txt"
    short.write_text("the fox")
    cli_fails(capsys, ["upcycle", str(src), str(out), "--verify-text", str(short)], "only", "tokens")
    short.write_text(TEXT)
    cli_fails(capsys, ["upcycle", str(dense_models["llama"]), str(out), "--verify-text", str(short)],
              "needs SRC's tokenizer", "random tokens")
    assert not out.exists()
