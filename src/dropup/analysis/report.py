"""The demo's report: the validation-loss table, ``loss.png`` and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _mean(v: dict[str, float]) -> float:
    return sum(v.values()) / len(v)


def loss_table(val_loss: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per model state, one column per domain plus their mean."""
    domains = list(next(iter(val_loss.values())))
    head = "| model | " + " | ".join(domains) + " | mean |"
    rows = [head, "|---" * (len(domains) + 2) + "|"]
    for name, v in val_loss.items():
        rows.append(f"| {name} | " + " | ".join(f"{v[d]:.4f}" for d in domains) + f" | {_mean(v):.4f} |")
    return "\n".join(rows)


def _mean_ratio(record: dict) -> str:
    ratios = record.get("router_max_min_ratio") or []
    finite = [r for r in ratios if r is not None]
    if not ratios:
        return "n/a"
    if len(finite) < len(ratios):
        return "inf (an expert got no token)"
    return f"{sum(finite) / len(finite):.2f}"


def plot(out_png: Path, results: dict, moe_runs: dict[str, Path], dense_run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dense = read_metrics(dense_run)
    ax = axes[0]
    ax.plot([r["tokens"] for r in dense], [r["lm_loss"] for r in dense], color="0.4", label="train")
    ev = [r for r in dense if "val_loss" in r]
    ax.plot([r["tokens"] for r in ev], [_mean(r["val_loss"]) for r in ev], "o-", color="k", ms=3,
            label="val (mean of domains)")
    ax.set(title="dense pretraining", xlabel="tokens", ylabel="loss")
    ax.legend()
    colors = {"naive": "tab:blue", "drop-0.5": "tab:red"}
    styles = ["-", "--", ":", "-."]
    for name, run in moe_runs.items():
        m = read_metrics(run)
        c = colors.get(name)
        axes[1].plot([r["tokens"] for r in m], [r["lm_loss"] for r in m], color=c, label=name)
        start = results["val_loss"][f"{name} start"]
        ev = [r for r in m if "val_loss" in r]
        for i, d in enumerate(start):
            xs = [0] + [r["tokens"] for r in ev]
            ys = [start[d]] + [r["val_loss"][d] for r in ev]
            axes[2].plot(xs, ys, styles[i % len(styles)], color=c, label=f"{name} {d}", marker="o", ms=2)
    for i, (d, v) in enumerate(results["val_loss"]["dense"].items()):
        axes[2].axhline(v, color="0.6", lw=0.8, ls=styles[i % len(styles)])
    axes[1].set(title="MoE training loss (8 experts, top-2)", xlabel="tokens after upcycling",
                ylabel="LM loss")
    axes[1].legend()
    axes[2].set(title="MoE validation loss per domain (grey: dense)", xlabel="tokens after upcycling",
                ylabel="loss")
    axes[2].legend(fontsize=7, ncol=2)
    for a in axes:  # 0, 200k, 400k... rather than 1e6-offset or run-together tick labels
        a.xaxis.set_major_formatter(EngFormatter(sep=""))
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_report(out: Path, results: dict, moe_runs: dict[str, Path], dense_run: Path) -> str:
    """Write ``loss.png`` and ``report.md`` into ``out``; returns the table."""
    plot(out / "loss.png", results, moe_runs, dense_run)
    table = loss_table(results["val_loss"])
    s, vl = results["config"], results["val_loss"]
    lines = [
        f"# dropup demo ({results['scale']})", "",
        "Dense model pretrained on the built-in corpus, then upcycled to 8 experts top-2 naively and "
        "by Drop-Upcycling (r = 0.5); both MoE models trained on the same tokens in the same order.",
        "", "## Validation loss per domain", "", table, "",
        "`dense` is the pretrained model both MoE models start from; `start` is right after "
        "upcycling, `end` after MoE training.", "",
        "## What was measured", "",
    ]
    names = list(moe_runs)
    for n in names:
        gain = _mean(vl[f"{n} start"]) - _mean(vl[f"{n} end"])
        lines.append(f"- {n}: mean validation loss {_mean(vl[f'{n} start']):.4f} at the start, "
                     f"{_mean(vl[f'{n} end']):.4f} at the end ({gain:+.4f} better).")
    if len(names) == 2:
        a, b = (f"{n} end" for n in names)
        diff = _mean(vl[b]) - _mean(vl[a])
        lead = names[0] if diff > 0 else names[1]
        lines.append(f"- after {results['tokens']['moe']:,} tokens, {lead} is ahead by {abs(diff):.4f} nats "
                     "(mean over domains). The paper finds naive upcycling ahead early and Drop-Upcycling "
                     "ahead after long training (hundreds of billions of tokens); a CPU demo sees only the "
                     "very beginning.")
    for n, run in moe_runs.items():
        last = [r for r in read_metrics(run) if r.get("router_max_min_ratio")]
        if last:
            lines.append(f"- {n}: expert load max/min ratio at the end (mean over layers): "
                         f"{_mean_ratio(last[-1])}; router entropy {_mean(dict(enumerate(last[-1]['router_entropy']))):.3f} nats.")
    lines += [
        "", "![training and validation curves](loss.png)", "",
        "## Setup", "",
        f"- model: Llama, {s['layers']} layers, hidden {s['hidden']}, FFN {s['d_f']}, {s['heads']} heads "
        f"({s['kv_heads']} KV), vocabulary {s['vocab_size']}, context {s['seq_len']}",
        f"- dense pretraining: {s['dense_steps']} steps x {s['global_batch']} sequences = "
        f"{results['tokens']['dense']:,} tokens, peak LR {s['dense_lr']}",
        f"- MoE training: {s['moe_steps']} steps = {results['tokens']['moe']:,} tokens each, peak LR "
        f"{s['moe_lr']}, load-balancing coefficient 0.02, same seed and data order",
        f"- data: {s['corpus_mb']} MB of text per domain, {s['val_fraction']:.0%} of documents held out; "
        f"validation on the first {s['eval_batches']} x {s['micro_batch']} sequences of each domain",
        f"- seed {results['seed']}; torch threads {results['torch_threads']}",
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_seconds"].items())
        + f"; {results['total_seconds']:.0f} s in all",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return table


def finite_table(val_loss: dict[str, dict[str, float]]) -> bool:
    return all(math.isfinite(x) for v in val_loss.values() for x in v.values())
