"""The routing figures, drawn from what routing.json holds (``analyze_routing``'s result); no
computing here beyond arranging the arrays. Matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, rows: int, cols: int, w: float, h: float):
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    return fig, axes


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def share_grid(result: dict, path: Path) -> None:
    """The paper's Figure 5: rows = the chosen layers, columns = models; in each panel, per expert
    one bar per domain (its share of that domain's top-k assignments), a dashed line at 1/E."""
    plt = _pyplot()
    models, domains = result["models"], result["domains"]
    rows = max(len(result["figure_layers"][m["name"]]) for m in models)
    fig, axes = _grid(plt, rows, len(models), min(10.0, max(3.0, 0.12 * max(m["num_experts"] for m in models) * len(domains))), 2.2)
    colors = plt.get_cmap("tab10")
    for c, m in enumerate(models):
        E = m["num_experts"]
        shares = np.asarray(m["shares"])
        width = 0.8 / len(domains)
        for r in range(rows):
            ax = axes[r][c]
            chosen = result["figure_layers"][m["name"]]
            if r >= len(chosen):
                ax.axis("off")
                continue
            li = m["layers"].index(chosen[r])
            for d, name in enumerate(domains):
                ax.bar(np.arange(E) + (d - (len(domains) - 1) / 2) * width, shares[li, d], width,
                       color=colors(d % 10), label=name)
            ax.axhline(1 / E, color="black", linestyle="--", linewidth=0.8)
            ax.set_xticks(range(0, E, max(1, E // 16)))
            ax.set_ylim(0, max(1.5 / E, float(shares[li].max()) * 1.1))
            ax.set_title(f"{m['name']}  layer {chosen[r]}", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("share of top-k", fontsize=7)
            if r == len(chosen) - 1:
                ax.set_xlabel("expert", fontsize=7)
    axes[0][0].legend(fontsize=6, loc="upper right")
    _save(fig, plt, path)


def jsd_by_layer(result: dict, path: Path) -> None:
    """Cross-domain Jensen-Shannon divergence per layer, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in result["models"]:
        ax.plot(m["layers"], m["jsd"], marker="o", markersize=3, label=f"{m['name']} (mean {m['mean_jsd']:.3f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("JSD across domains (nats)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    _save(fig, plt, path)


def coactivation(result: dict, path: Path) -> None:
    """Per chosen layer (rows) and model (columns): the fraction of tokens whose top-k holds both
    experts i and j."""
    plt = _pyplot()
    models = result["models"]
    rows = max(len(result["figure_layers"][m["name"]]) for m in models)
    fig, axes = _grid(plt, rows, len(models), 3.0, 2.6)
    for c, m in enumerate(models):
        tokens = max(1, int(np.asarray(m["counts"])[0].sum()) // m["top_k"])
        chosen = result["figure_layers"][m["name"]]
        for r in range(rows):
            ax = axes[r][c]
            if r >= len(chosen):
                ax.axis("off")
                continue
            co = np.asarray(m["coactivation"][m["layers"].index(chosen[r])], dtype=np.float64) / tokens
            im = ax.imshow(co, cmap="viridis", vmin=0)
            ticks = range(0, len(co), max(1, len(co) // 8))
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.set_xlabel("expert", fontsize=7)
            ax.set_title(f"{m['name']}  layer {chosen[r]}", fontsize=8)
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    _save(fig, plt, path)


def saturation(result: dict, path: Path) -> None:
    """Mean top-k overlap with the final checkpoint's routing against the training step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s in result["saturation"]:
        ax.plot(s["steps"], s["mean_overlap"], marker="o", label=Path(s["run"]).name)
    ax.set_xlabel("step")
    ax.set_ylabel("top-k overlap with final")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    _save(fig, plt, path)
