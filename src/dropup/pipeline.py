"""The steps `dropup demo` and `dropup repro` share: a study's scale, its data (corpus harvested
from this machine, one tokenizer, one dataset per domain), a from-scratch dense Llama, a training
run on the equal-weight mixture, and the validation curve a run logged.

Each step is a thin composition of the public pieces (``dropup.data``, ``dropup.model``,
``dropup.train``); a study decides what to run and how to report it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml


@dataclass
class Scale:
    """A study's shapes and budgets: the corpus, the tokenizer, the dense model, the batches and
    the steps of the dense and the MoE training."""

    corpus_mb: float  # text per domain
    vocab_size: int
    hidden: int
    d_f: int
    layers: int
    heads: int
    kv_heads: int
    seq_len: int
    global_batch: int
    micro_batch: int
    dense_steps: int
    moe_steps: int
    dense_lr: float
    moe_lr: float
    eval_interval: int
    eval_batches: int
    val_fraction: float = 0.05
    warmup_steps: int = 0  # 0: a tenth of each phase's steps

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def eval_tokens(self) -> int:
        """Validation tokens per domain that training's evaluation reads: ``eval_batches``
        micro-batches of windows of seq_len + 1 tokens with stride seq_len (``dropup eval`` on
        this many tokens scores the very same windows)."""
        return self.eval_batches * self.micro_batch * self.seq_len + 1


def build_data(out: Path, s: Scale, seed: int, tokenizer: Path | None = None) -> dict[str, Path]:
    """OUT/corpus (every domain the machine has text for), OUT/tokenizer (a byte-level BPE
    trained on an equal-size sample of each domain, unless ``tokenizer`` is given) and one
    prepared dataset per domain in OUT/data/<domain>."""
    from dropup.data.corpus import CorpusOptions, build_corpus, format_report
    from dropup.data.prepare import PrepareOptions, prepare, sample_documents, train_tokenizer
    from dropup.data.readers import InputFile, ReadOptions

    manifest = build_corpus(CorpusOptions(out=str(out / "corpus"), max_mb=s.corpus_mb, seed=seed))
    print(format_report(manifest))
    files = {d: out / "corpus" / f"{d}.jsonl" for d, m in manifest["domains"].items() if m["docs"]}
    if tokenizer is None:
        sample = sample_documents([InputFile(p, "jsonl") for p in files.values()], ReadOptions(),
                                  int(s.corpus_mb * 1e6), seed)
        tokenizer = out / "tokenizer"
        train_tokenizer(sample, s.vocab_size, tokenizer)
    data = {}
    for d, path in files.items():
        meta = prepare(PrepareOptions(inputs=[str(path)], out=str(out / "data" / d), tokenizer=str(tokenizer),
                                      domain=d, val_fraction=s.val_fraction, seed=seed, progress=False))
        sp = meta["splits"]
        print(f"{d:>6}: train {sp['train']['tokens']:,} tokens, val {sp.get('val', {}).get('tokens', 0):,} tokens")
        data[d] = out / "data" / d
    return data


def dense_init(path: Path, s: Scale, vocab: int, seed: int) -> Path:
    """A from-scratch dense Llama of the scale's shape (every matrix N(0, 0.02^2), seeded)."""
    from dropup.hub.config import ModelConfig
    from dropup.model.decoder import build_model
    from dropup.model.io import save_model
    from dropup.train.config import PRESETS

    hf = {**PRESETS["dense-tiny"], "hidden_size": s.hidden, "intermediate_size": s.d_f,
          "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
          "vocab_size": vocab, "max_position_embeddings": s.seq_len}
    torch.manual_seed(seed)
    save_model(build_model(ModelConfig.from_hf(hf), device="cpu", dtype=torch.float32, std=0.02), path)
    return path


def train_run(run_dir: Path, init: Path, data: dict[str, Path], s: Scale, steps: int, lr: float, seed: int,
              device: str = "cpu", nproc: int = 1, **settings) -> Path:
    """Train from ``init`` on the equal-weight mixture of ``data``; returns the final Hugging Face
    checkpoint. The run's config is written beside it (RUN.yaml) so that it can be re-run by hand
    with ``dropup train``; ``settings`` are further top-level TrainConfig keys. ``nproc`` > 1
    runs it under torchrun (FSDP2: one process per GPU, or gloo processes on a CPU)."""
    from dropup.train.config import load_config
    from dropup.train.loop import train

    cfg = {"model": {"init": str(init)},
           "data": {"datasets": [{"path": str(p), "weight": 1.0, "name": d} for d, p in data.items()],
                    "seq_len": s.seq_len, "eval_batches": s.eval_batches},
           "batch": {"global_batch": s.global_batch, "micro_batch": s.micro_batch},
           "steps": steps, "optim": {"lr": lr, "warmup_steps": s.warmup_steps or max(1, steps // 10)},
           "seed": seed, "log_interval": max(1, s.eval_interval // 5), "eval_interval": s.eval_interval,
           "save_interval": 0, "keep_last": 1, "out_dir": str(run_dir), "device": device, **settings}
    cfg_path = run_dir.with_suffix(".yaml")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if nproc == 1:
        train(load_config(cfg_path))
    else:
        _torchrun(cfg_path, nproc)
    return run_dir / "ckpt" / f"step_{steps}" / "model"


def _torchrun(cfg_path: Path, nproc: int) -> None:
    import subprocess
    import sys

    from dropup.errors import UserError

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dropup", "train", "--config", str(cfg_path)]
    if subprocess.run(cmd).returncode:
        raise UserError(f"training under torchrun failed ({' '.join(cmd[2:])}); its ranks' messages are above")


def fit_eval(s: Scale, data: dict[str, Path]) -> Scale:
    """The scale with ``eval_batches`` lowered, where a domain's val split is short, to what every
    domain holds: training's evaluation and ``evaluate`` then score the same windows of every
    domain."""
    from dropup.data.tokens import TokenFile
    from dropup.errors import UserError

    fits = {d: TokenFile(p, "val").num_sequences(s.seq_len) // s.micro_batch for d, p in data.items()}
    short = min(fits, key=fits.__getitem__)
    if fits[short] < 1:
        raise UserError(f"domain {short}'s validation split holds fewer than one batch of {s.micro_batch} "
                        f"windows of {s.seq_len + 1} tokens; raise corpus_mb or val_fraction")
    return dataclasses.replace(s, eval_batches=min(s.eval_batches, fits[short]))


def evaluate_models(models: list[Path], data: dict[str, Path], s: Scale, device: str = "cpu",
                    out: Path | None = None) -> list[dict]:
    """``dropup eval`` (float32) of each model on the windows training's evaluation reads
    (``Scale.eval_tokens``; see ``fit_eval``): [{loss: {domain: loss}, mean}] in order."""
    from dropup.analysis.evaluate import EvalOptions, evaluate

    rep = evaluate(EvalOptions([str(m) for m in models], [str(x) for x in data.values()], tokens=s.eval_tokens,
                               seq_len=s.seq_len, batch_size=s.micro_batch, device=device, dtype="float32",
                               out=str(out) if out else None, progress=False))
    return [{"loss": {d: x["loss"] for d, x in m["datasets"].items()}, "mean": m["macro"]["loss"]}
            for m in rep["models"]]


def val_curve(run_dir: Path) -> list[dict]:
    """The validation losses a run logged: [{step, tokens, loss: {dataset: loss}, mean}] at every
    evaluation, in step order."""
    from dropup.analysis.report import read_metrics

    return [{"step": r["step"], "tokens": r["tokens"], "loss": r["val_loss"],
             "mean": sum(r["val_loss"].values()) / len(r["val_loss"])}
            for r in read_metrics(run_dir) if r.get("val_loss")]


def steady_tokens_per_s(run_dir: Path) -> float | None:
    """The median of a run's logged tokens/s after its first log window (which holds compilation)."""
    from dropup.analysis.report import read_metrics

    rates = sorted(r["tokens_per_s"] for r in read_metrics(run_dir)[1:] if r.get("tokens_per_s"))
    return rates[len(rates) // 2] if rates else None


def routing_summary(models: dict[str, Path], data: dict[str, Path], s: Scale, out: Path, device: str = "cpu",
                    tokens: int = 200_000) -> dict:
    """``dropup analyze routing`` of ``models`` into OUT (the paper's Figure 5 and the rest), on as
    many validation tokens per domain as the smallest domain has (at most ``tokens``): the mean
    JSD and dead experts per model, and the comparison table."""
    from dropup.analysis.specialisation import RoutingOptions, analyze_routing, comparison_table
    from dropup.data.tokens import TokenFile

    tokens = min(tokens, *(len(TokenFile(p, "val")) for p in data.values()))
    result = analyze_routing(RoutingOptions([str(m) for m in models.values()], [str(p) for p in data.values()],
                                            str(out), tokens=tokens, seq_len=s.seq_len, batch_size=s.micro_batch,
                                            device=device, overwrite=True))
    named = dict(zip(models, result["models"]))
    return {"tokens": tokens, "mean_jsd": {n: m["mean_jsd"] for n, m in named.items()},
            "dead_experts": {n: m["dead_total"] for n, m in named.items()}, "table": comparison_table(result)}
