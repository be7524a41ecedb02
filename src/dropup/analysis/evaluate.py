"""``dropup eval``: loss, perplexity and bits per byte of checkpoints on prepared datasets.

What is scored. A dataset split is one packed token stream (documents back to back, each ending
in EOS), as the trainer reads it. It is cut into non-overlapping windows of ``seq_len + 1``
tokens with stride ``seq_len`` (``TokenFile.sequence``, the windows of training's validation);
each window predicts its last ``seq_len`` tokens from the ones before them inside the window, and
a last, shorter window takes what remains. Every token but the stream's first is therefore
scored exactly once: ``tokens scored = tokens read - 1``. Attention crosses document boundaries
as in training; the first targets of each window see little context, so the loss is a little
higher than with overlapping windows, the more so the shorter ``seq_len``.

This differs from lm-evaluation-harness's ``loglikelihood_rolling`` (its perplexity tasks):
lm-eval scores each document on its own, in rolling windows that restart at the document (its
first token predicted from the BOS/EOS prefix token), and never attends across documents; so its
numbers are close to these but not equal.

Loss is the mean next-token negative log-likelihood in nats over the scored tokens, perplexity
its exponential, bits per byte the summed NLL over the corpus divided by ln 2 times the UTF-8
bytes of the same scored tokens (the dataset's ``token_bytes`` table: EOS counts 0), not a mean
of per-document values. The macro average weights datasets equally.

A checkpoint is a Hugging Face model directory (dense or MoE, anything ``load_model`` reads) or
a training run directory, which stands for all its ``ckpt/step_N/model`` exports in step order
(a curve over the tokens trained, plotted into OUT).
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dropup.data.tokens import TokenFile, read_meta
from dropup.errors import UserError
from dropup.hub.atomic import atomic_dir, atomic_write_text
from dropup.hub.card import check_tokenizers
from dropup.model.io import load_config, load_model, runtime
from dropup.train.checkpoints import ModelRef, model_refs
from dropup.model.lm_loss import bits_per_byte, target_bytes, window_nll
from dropup.options import Device, Precision, check_choices, check_ranges, ranged

FORMAT = "dropup-eval"
VERSION = 1
MAX_DEFAULT_SEQ_LEN = 4096  # the paper's training context; longer-context models are scored at it


@dataclass
class EvalOptions:
    checkpoints: list[str]
    datasets: list[str]
    split: str = "val"
    tokens: int | None = ranged(None, ge=2, integer=True, hint="tokens read per dataset; 2 score one")
    seq_len: int | None = ranged(None, ge=1, integer=True)  # None: max_position_embeddings, at most 4096
    batch_size: int = ranged(8, ge=1, integer=True)  # windows per forward pass
    device: Device = "auto"
    dtype: Precision = "auto"
    allow_tokenizer_mismatch: bool = False
    out: str | None = None  # eval.json (and loss.png for a run directory's curve)
    progress: bool = True

    def validate(self) -> None:
        check_choices(self)
        check_ranges(self)
        if not self.checkpoints:
            raise UserError("no checkpoint given")
        if not self.datasets:
            raise UserError("no dataset given (--data DATASET ...)")


@dataclass
class Score:
    """Summed NLL (nats) over ``tokens`` scored targets standing for ``bytes`` of text."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int | None = 0

    def add(self, nll: float, tokens: int, n_bytes: int | None) -> None:
        self.nll += nll
        self.tokens += tokens
        self.bytes = None if n_bytes is None or self.bytes is None else self.bytes + n_bytes

    def as_dict(self) -> dict:
        loss = self.nll / self.tokens
        return {"loss": loss, "perplexity": _exp(loss), "bpb": bits_per_byte(self.nll, self.bytes),
                "tokens": self.tokens, "bytes": self.bytes}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def windows(file: TokenFile, seq_len: int, n_tokens: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of the windows over the first ``n_tokens`` tokens (see the module docstring): full
    windows ``batch_size`` at a time, then the shorter last window, if any, alone."""
    full = (n_tokens - 1) // seq_len
    for start in range(0, full, batch_size):
        idx = range(start, min(start + batch_size, full))
        yield torch.from_numpy(np.stack([file.sequence(i, seq_len) for i in idx]))
    if full * seq_len < n_tokens - 1:
        yield torch.from_numpy(np.asarray(file.tokens[full * seq_len:n_tokens], dtype=np.int64))[None]


def num_batches(seq_len: int, n_tokens: int, batch_size: int) -> int:
    full = (n_tokens - 1) // seq_len
    return math.ceil(full / batch_size) + (full * seq_len < n_tokens - 1)


@torch.no_grad()
def score(model: torch.nn.Module, file: TokenFile, seq_len: int, n_tokens: int, batch_size: int,
          device: torch.device, table: np.ndarray | None, tick=lambda: None) -> Score:
    """The Score of ``model`` on the first ``n_tokens`` tokens of ``file``."""
    s = Score()
    table_t = None if table is None else torch.from_numpy(table)
    for batch in windows(file, seq_len, n_tokens, batch_size):
        _, nll = window_nll(model, batch.to(device))
        s.add(float(nll), batch[:, 1:].numel(), target_bytes(table_t, batch))
        tick()
    return s


# ---- what to evaluate ---------------------------------------------------------------------------


def dataset_names(paths: list[str]) -> list[str]:
    """Each dataset's directory name; the path as given where two names would collide."""
    names = [Path(p).resolve().name for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def _check_pair(ckpt: ModelRef, vocab: int, file: TokenFile, opts: EvalOptions) -> None:
    file.check_vocab(vocab, f"checkpoint {ckpt.path}'s")
    if opts.allow_tokenizer_mismatch:
        return
    try:
        check_tokenizers(ckpt.path, [file.path])
    except UserError:
        raise UserError(f"dataset {file.path} was tokenised with a different tokenizer from checkpoint "
                        f"{ckpt.path}'s (their vocabularies differ), so its token ids mean other text; "
                        f"prepare it with --tokenizer {ckpt.path}, or pass --allow-tokenizer-mismatch") from None


def _seq_len(opts: EvalOptions, ckpt: ModelRef, max_positions: int) -> int:
    if opts.seq_len is None:
        return min(max_positions, MAX_DEFAULT_SEQ_LEN)
    if opts.seq_len > max_positions:
        raise UserError(f"--seq-len {opts.seq_len} is longer than checkpoint {ckpt.path}'s context "
                        f"(max_position_embeddings {max_positions}); use at most {max_positions}")
    return opts.seq_len


# ---- the command --------------------------------------------------------------------------------


def evaluate(opts: EvalOptions) -> dict:
    """Score every checkpoint on every dataset; returns eval.json's contents (written to
    ``opts.out`` when set, with loss.png when a run directory gave a curve). Every input is
    checked before the first model is loaded; OUT appears whole or not at all."""
    opts.validate()
    ckpts = model_refs(opts.checkpoints)
    names = dataset_names(opts.datasets)
    files = {}
    for name, path in zip(names, opts.datasets):
        if not Path(path).is_dir():
            raise UserError(f"--data {path}: not a directory (a dataset written by `dropup data prepare`)")
        splits = read_meta(path)["splits"]
        if opts.split not in splits:
            raise UserError(f"dataset {path} has no {opts.split!r} split (it has: {', '.join(splits) or 'none'}); "
                            "choose one with --split")
        files[name] = TokenFile(path, opts.split)
    n_tokens = {}
    for name, f in files.items():
        n = len(f) if opts.tokens is None else opts.tokens
        if len(f) < n or n < 2:
            want = f"--tokens {opts.tokens}" if opts.tokens is not None else "2 (one scored token)"
            raise UserError(f"dataset {f.path}'s {opts.split} split has {len(f)} tokens, fewer than {want}")
        n_tokens[name] = n
    device, dtype = runtime(opts.device, opts.dtype)
    plan = []
    for c in ckpts:
        cfg = load_config(c.path)
        for f in files.values():
            _check_pair(c, cfg.vocab_size, f, opts)
        plan.append((c, _seq_len(opts, c, cfg.max_position_embeddings)))
    tables = {name: f.token_bytes() for name, f in files.items()}

    def run() -> dict:
        total = sum(num_batches(L, n_tokens[name], opts.batch_size) for _, L in plan for name in files)
        with _Progress(opts.progress, total) as bar:
            models = []
            for c, seq_len in plan:
                bar.describe(str(c.path))
                model = load_model(c.path, device=device, dtype=dtype).eval()
                scores = {name: score(model, f, seq_len, n_tokens[name], opts.batch_size, device, tables[name],
                                      bar.tick).as_dict() for name, f in files.items()}
                del model
                models.append({"checkpoint": str(c.path), "label": c.label, "run": str(c.run) if c.run else None,
                               "step": c.step, "tokens_trained": c.tokens_trained, "seq_len": seq_len,
                               "datasets": scores, "macro": macro(scores)})
        return {"format": FORMAT, "version": VERSION, "split": opts.split,
                "options": {k: v for k, v in asdict(opts).items() if k not in ("progress", "out")}
                | {"device": device.type, "dtype": str(dtype).removeprefix("torch.")},
                "datasets": {name: {"path": str(f.path), "split_tokens": len(f), "tokens_read": n_tokens[name]}
                             for name, f in files.items()},
                "models": models}

    if opts.out is None:
        return run()
    with atomic_dir(opts.out, label="--out", advice="choose a new directory or remove it") as tmp:
        report = run()
        atomic_write_text(tmp / "eval.json", report_json(report) + "\n")
        if any(m["step"] is not None for m in report["models"]):
            plot_curve(report, tmp / "loss.png")
    return report


def macro(scores: dict[str, dict]) -> dict:
    """The datasets' equal-weight means (perplexity: of the mean loss); bpb None unless every
    dataset has one."""
    loss = sum(s["loss"] for s in scores.values()) / len(scores)
    bpbs = [s["bpb"] for s in scores.values()]
    return {"loss": loss, "perplexity": _exp(loss),
            "bpb": None if None in bpbs else sum(bpbs) / len(bpbs)}


def report_json(report: dict) -> str:
    """eval.json's text: JSON has no infinity, so an overflowing perplexity is null."""
    return json.dumps(_json_safe(report), indent=1)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


class _Progress:
    """A rich bar over batches on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("eval", total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)


# ---- output -------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """One row per checkpoint (by directory name; a run's by run and step): loss, perplexity and
    bits per byte per dataset, then the macro average (a rich table, rendered as plain text)."""
    from rich.console import Console
    from rich.table import Table

    names = list(report["datasets"])
    table = Table(title=f"{report['split']} split: loss (nats) / perplexity / bits per byte")
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("tokens trained", justify="right")
    for name in [*names, "macro"]:
        table.add_column(name, justify="right")

    def cell(s: dict) -> str:
        bpb = "-" if s["bpb"] is None else f"{s['bpb']:.4f}"
        return f"{s['loss']:.4f} / {s['perplexity']:.2f} / {bpb}"

    for m in report["models"]:
        label = m["label"]
        trained = "" if m["tokens_trained"] is None else f"{m['tokens_trained']:,}"
        table.add_row(label, trained, *[cell(m["datasets"][n]) for n in names], cell(m["macro"]))
    buf = io.StringIO()
    Console(file=buf, width=max(100, 40 + 30 * (len(names) + 1)), no_color=True, highlight=False).print(table)
    return buf.getvalue().rstrip("\n")


def plot_curve(report: dict, path: Path) -> None:
    """Loss per dataset against tokens trained, one line per (run, dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict]] = {}
    for m in report["models"]:
        if m["step"] is not None:
            runs.setdefault(m["run"], []).append(m)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, points in runs.items():
        xs = [p["tokens_trained"] if p["tokens_trained"] is not None else p["step"] for p in points]
        for name in report["datasets"]:
            label = name if len(runs) == 1 else f"{Path(run).name}: {name}"
            ax.plot(xs, [p["datasets"][name]["loss"] for p in points], marker="o", label=label)
    ax.set_xlabel("tokens trained")
    ax.set_ylabel(f"{report['split']} loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
