"""`dropup analyze experts`: how alike an MoE's experts are, by weights and by what they compute.

For each checkpoint (a training run directory stands for its checkpoints ``ckpt/step_N/model``,
oldest first) and each MoE layer:

- ``cosine``: the [E, E] cosine similarity of the experts' weights (from ``dropup inspect``'s
  ``layer_similarity``, the one home of that computation);
- ``identical_neurons``: the [E, E] fraction of neurons bit-identical between two experts;
- ``identical_to_dense`` (with ``--dense``): each expert's fraction of neurons bit-identical to
  the dense source's at the same position (1 for naive upcycling, 1 - r for Drop-Upcycling with
  shared indices, about (1 - r)^3 with per-matrix indices);
- ``output_cka`` (with ``--data``): the [E, E] linear CKA between the experts' outputs when every
  expert is applied to the same tokens (the hidden states entering the layer);

and, with ``--data``, per dataset (domain) the loss with each token's rank-1 expert removed and
with ranks 1-2 removed, the next-best experts taking their place (DeepSeekMoE's redundancy test:
interchangeable experts barely change the loss).

experts.json::

    {"format": "dropup-experts", "version": 1, "options": {...},
     "checkpoints": [
       {"path": str, "label": str, "step": int | null,
        "layers": [{"layer": int, "cosine": [[E x E]], "identical_neurons": [[E x E]],
                    "identical_to_dense": [E] | null, "output_cka": [[E x E]] | null}],
        "summary": {"mean_cosine": float, "mean_identical_neurons": float,
                    "mean_identical_to_dense": float | null, "mean_output_cka": float | null},
        "redundancy": {domain: {"loss": float, "skip_1": float | null, "skip_2": float | null}}
                      (skip_k: loss change in nats; null where top-k + k exceeds the expert count)
       }],
     "curves": {"step": [...], "mean_cosine": [...], ...} | null   (runs only)}

Means are over the off-diagonal pairs of every MoE layer. Also written: ``similarity_<label>.png``
(heatmaps of a few layers), ``curves.png`` for runs, and ``report.md``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dropup.analysis.experts import _moe_config, layer_similarity
from dropup.convert import surgery
from dropup.errors import UserError
from dropup.hub import names as archs
from dropup.hub.atomic import atomic_dir
from dropup.hub.config import ModelConfig
from dropup.hub.safetensors import CheckpointReader
from dropup.options import check_ranges, ranged

FORMAT, VERSION = "dropup-experts", 1
SKIPS = (1, 2)


@dataclass
class ExpertsOptions:
    dense: str | None = None  # the dense source, for identical_to_dense
    data: list[str] = field(default_factory=list)  # datasets (one domain each) for CKA and redundancy
    # per dataset for the redundancy test; the output CKA takes the first `tokens` of them all
    tokens: int = ranged(2048, ge=2, integer=True, hint="tokens of each dataset's val split")
    seq_len: int = ranged(256, ge=1, integer=True)
    plot_layers: int = ranged(4, ge=0, integer=True, hint="0 draws no heatmaps")
    progress: bool = True

    def validate(self) -> None:
        check_ranges(self)


# ---------------------------------------------------------------------------------------------
# Inputs


def _dense_ffn(dense: CheckpointReader, cfg: ModelConfig) -> dict[int, dict[str, torch.Tensor]]:
    """The dense source's FFN of every layer, checked against the MoE's shapes."""
    dcfg = ModelConfig.from_hf(dense.config, where=f"--dense {dense.path}")
    shape = archs.DenseShape.of(dcfg)
    want = {"gate": (cfg.moe_intermediate_size, cfg.hidden_size), "up": (cfg.moe_intermediate_size, cfg.hidden_size),
            "down": (cfg.hidden_size, cfg.moe_intermediate_size)}
    if dcfg.num_hidden_layers != cfg.num_hidden_layers:
        raise UserError(f"analyze experts: --dense {dense.path} has {dcfg.num_hidden_layers} layers, the MoE "
                        f"{cfg.num_hidden_layers}; pass the dense checkpoint the MoE was upcycled from")
    out = {}
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        out[i] = {}
        for m in surgery.FFN_MATRICES:
            name = shape.ffn_name(i, m)
            info = dense.tensors.get(name)
            if info is None or tuple(info.shape) != want[m]:
                got = "no such tensor" if info is None else f"shape {list(info.shape)}"
                raise UserError(f"analyze experts: --dense {dense.path}: {name} has {got}, but the MoE's "
                                f"experts need {list(want[m])}; pass the dense checkpoint the MoE was "
                                "upcycled from")
            out[i][m] = dense.get(name)
    return out


def _load_datasets(paths: list[str], cfg: ModelConfig, opts: ExpertsOptions) -> dict[str, torch.Tensor]:
    """The first ``opts.tokens`` tokens of each dataset's val split, as [n, seq_len + 1] windows."""
    from dropup.data.tokens import TokenFile, validation_batches

    out = {}
    for p in paths:
        f = TokenFile(p, "val")
        f.check_vocab(cfg.vocab_size)
        seq = min(opts.seq_len, max(1, len(f) - 1))
        n = max(1, opts.tokens // seq)
        batches = validation_batches(f, seq, n, 1)
        if not batches:
            raise UserError(f"analyze experts: dataset {p} has a val split of {len(f)} tokens, too few "
                            "for one window; prepare it with more validation text")
        name = f.meta.get("domain") or Path(p).name
        if name in out:
            name = f"{name} ({p})"
        out[name] = batches[0]
    return out


def _check_tokenizer(ckpt: Path, datasets: list[str]) -> None:
    """Token ids must mean the same text to the model as to the datasets."""
    from dropup.hub.card import check_tokenizers

    try:
        check_tokenizers(ckpt, datasets)
    except UserError as e:
        raise UserError(f"analyze experts: {e}") from None


# ---------------------------------------------------------------------------------------------
# Measurements


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [N, d] representations of the same N inputs (Kornblith et al. 2019,
    "Similarity of Neural Network Representations Revisited"): 1 for outputs equal up to a
    rotation and scale, near 0 for unrelated ones."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    xy = (x.t() @ y).square().sum()
    xx = (x.t() @ x).square().sum().sqrt()
    yy = (y.t() @ y).square().sum().sqrt()
    return (xy / (xx * yy).clamp_min(1e-300)).item()


def expert_outputs(moe, x: torch.Tensor) -> list[torch.Tensor]:
    """Every expert of an MoE layer applied to the same tokens ``x`` [N, d]: E outputs [N, d]."""
    from dropup.model.decoder import swiglu

    w = moe.experts
    x = x.to(w.gate_proj.dtype)
    return [torch.nn.functional.linear(
        swiglu(torch.nn.functional.linear(x, w.gate_proj[e]), torch.nn.functional.linear(x, w.up_proj[e])),
        w.down_proj[e]) for e in range(moe.num_experts)]


def _moe_inputs(model, batch: torch.Tensor) -> dict[int, torch.Tensor]:
    """The hidden states entering each MoE layer (after the post-attention norm), [N, d]."""
    from dropup.model.decoder import MoE

    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoE):
            hooks.append(layer.mlp.register_forward_pre_hook(
                lambda mod, args, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))))
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def output_cka(model, batches: list[torch.Tensor], tokens: int) -> dict[int, torch.Tensor]:
    """[E, E] linear CKA between the experts' outputs on the same tokens, per MoE layer: the
    hidden states entering the layer for the first ``tokens`` input tokens of ``batches``."""
    seen: dict[int, list[torch.Tensor]] = {}
    for b in batches:
        for i, x in _moe_inputs(model, b).items():
            seen.setdefault(i, []).append(x)
    out = {}
    for i, xs in seen.items():
        ys = expert_outputs(model.model.layers[i].mlp, torch.cat(xs)[:tokens])
        e = len(ys)
        m = torch.eye(e, dtype=torch.float64)
        for a in range(e):
            for b in range(a + 1, e):
                m[a, b] = m[b, a] = linear_cka(ys[a], ys[b])
        out[i] = m
    return out


def set_skip_top_ranks(model, skip: int) -> None:
    """Route every token past its ``skip`` first-ranked experts (0 restores normal routing)."""
    from dropup.model.decoder import MoE

    for m in model.modules():
        if isinstance(m, MoE):
            if skip:
                m.skip_top_ranks = skip
            else:
                m.__dict__.pop("skip_top_ranks", None)  # back to the class default


def redundancy(model, windows: torch.Tensor, cfg: ModelConfig) -> dict:
    """Loss on ``windows`` [n, T + 1] and its change when each token's top-ranked experts are
    removed (skip_1: rank 1; skip_2: ranks 1 and 2); None where too few experts remain."""
    def loss() -> float:
        return model(windows[:, :-1], targets=windows[:, 1:]).item()

    base = loss()
    out = {"loss": base}
    try:
        for s in SKIPS:
            if cfg.num_experts_per_tok + s > cfg.num_experts:
                out[f"skip_{s}"] = None
                continue
            set_skip_top_ranks(model, s)
            out[f"skip_{s}"] = loss() - base
    finally:
        set_skip_top_ranks(model, 0)
    return out


def _off_mean(m: torch.Tensor) -> float:
    off = ~torch.eye(m.shape[0], dtype=torch.bool)
    return m[off].mean().item()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def analyze_checkpoint(path: Path, opts: ExpertsOptions, datasets: dict[str, torch.Tensor] | None,
                       log=None) -> dict:
    ck = CheckpointReader(path, "CKPT")
    cfg = _moe_config_for_analysis(ck)
    dense = _dense_ffn(CheckpointReader(opts.dense, "--dense"), cfg) if opts.dense else None
    layers = []
    moe_layers = cfg.moe_layers
    for i in moe_layers:
        s = layer_similarity(ck, cfg.model_type, i, cfg.num_experts, dense[i] if dense else None)
        layers.append({"layer": i, "cosine": s.cosine.tolist(), "identical_neurons": s.identical.tolist(),
                       "identical_to_dense": None if s.identical_to_dense is None else s.identical_to_dense.tolist(),
                       "output_cka": None})
        if log:
            log(f"{path}: layer {i} weights compared")
    red = None
    if datasets:
        from dropup.model.io import load_model

        model = load_model(path, dtype=torch.float32, moe_impl="loop").eval()
        inputs = [w[:, :-1] for w in datasets.values()]
        cka = output_cka(model, inputs, opts.tokens)
        for rec in layers:
            rec["output_cka"] = cka[rec["layer"]].tolist()
        red = {name: redundancy(model, w, cfg) for name, w in datasets.items()}
        if log:
            log(f"{path}: outputs compared on {min(opts.tokens, sum(x.numel() for x in inputs))} tokens")
    summary = {
        "mean_cosine": _mean([_off_mean(torch.tensor(r["cosine"])) for r in layers]),
        "mean_identical_neurons": _mean([_off_mean(torch.tensor(r["identical_neurons"])) for r in layers]),
        "mean_identical_to_dense": _mean([sum(r["identical_to_dense"]) / len(r["identical_to_dense"])
                                          for r in layers]) if dense else None,
        "mean_output_cka": _mean([_off_mean(torch.tensor(r["output_cka"])) for r in layers]) if datasets else None,
    }
    return {"path": str(path), "layers": layers, "summary": summary, "redundancy": red}


def _moe_config_for_analysis(ck: CheckpointReader) -> ModelConfig:
    try:
        return _moe_config(ck)
    except UserError as e:
        if "is not an MoE" in str(e):
            raise UserError(f"analyze experts: {ck.path} is not an MoE checkpoint (model_type "
                            f"{ck.config.get('model_type')!r}): it has no experts to compare; describe it "
                            "with `dropup inspect` or measure it with `dropup eval`") from None
        raise UserError(str(e).replace("inspect: ", "analyze experts: ", 1)) from None


def analyze_experts(ckpts: list[str | Path], out: str | Path, opts: ExpertsOptions | None = None) -> dict:
    """Measure expert diversity of ``ckpts`` and write experts.json, PNGs and report.md to ``out``.

    Every input is checked (MoE, --dense shapes, datasets and tokenizers) before anything is
    computed; ``out`` appears whole or not at all. Returns the experts.json record."""
    opts = opts or ExpertsOptions()
    opts.validate()
    if not ckpts:
        raise UserError("analyze experts: pass at least one CKPT (a checkpoint or run directory)")
    from dropup.train.checkpoints import model_refs

    items = [(r.label, r.step, r.path) for r in model_refs(ckpts)]
    for _, _, p in items:  # refuse bad input before the long part
        cfg = _moe_config_for_analysis(CheckpointReader(p, "CKPT"))
        if opts.dense:
            _dense_ffn(CheckpointReader(opts.dense, "--dense"), cfg)
        if opts.data:
            _check_tokenizer(p, opts.data)
    datasets = _load_datasets(opts.data, cfg, opts) if opts.data else None
    log = (lambda line: print(f"dropup analyze experts: {line}", file=sys.stderr, flush=True)) \
        if opts.progress else None
    record = {"format": FORMAT, "version": VERSION, "options": asdict(opts), "checkpoints": [], "curves": None}
    for label, step, p in items:
        r = analyze_checkpoint(p, opts, datasets, log)
        record["checkpoints"].append({"label": label, "step": step, **r})
    stepped = [c for c in record["checkpoints"] if c["step"] is not None]
    if stepped:
        record["curves"] = _curves(stepped)
    with atomic_dir(out, existing="replace", label="--out", protect=[("CKPT", p) for _, _, p in items]) as tmp:
        (tmp / "experts.json").write_text(json.dumps(record, indent=1) + "\n")
        for c in record["checkpoints"]:
            if opts.plot_layers:
                plot_heatmaps(c, tmp / f"similarity_{_safe(c['label'])}.png", opts.plot_layers)
        if record["curves"]:
            plot_curves(record["curves"], tmp / "curves.png")
        (tmp / "report.md").write_text(format_report(record))
    return record


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in label)


def _curves(cks: list[dict]) -> dict:
    curves: dict = {"step": [c["step"] for c in cks]}
    for key in ("mean_cosine", "mean_identical_neurons", "mean_identical_to_dense", "mean_output_cka"):
        curves[key] = [c["summary"][key] for c in cks]
    for domain in cks[0]["redundancy"] or {}:
        for s in SKIPS:
            curves[f"{domain} skip_{s}"] = [(c["redundancy"] or {}).get(domain, {}).get(f"skip_{s}") for c in cks]
    return curves


# ---------------------------------------------------------------------------------------------
# Outputs


def _plot_layers(n_layers: int, k: int) -> list[int]:
    """Up to k layer positions spread from first to last."""
    if k >= n_layers:
        return list(range(n_layers))
    return sorted({round(j * (n_layers - 1) / max(1, k - 1)) for j in range(k)})


def plot_heatmaps(ck: dict, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [ck["layers"][j] for j in _plot_layers(len(ck["layers"]), k)]
    kinds = [("cosine", "weight cosine")] + ([("output_cka", "output CKA")] if picks[0]["output_cka"] else [])
    fig, axes = plt.subplots(len(kinds), len(picks), figsize=(3 * len(picks), 3 * len(kinds)), squeeze=False)
    for r, (key, title) in enumerate(kinds):
        for c, rec in enumerate(picks):
            ax = axes[r][c]
            im = ax.imshow(rec[key], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"layer {rec['layer']}: {title}", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(ck["label"])
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    red = [k for k in curves if " skip_" in k]
    fig, axes = plt.subplots(1, 2 if red else 1, figsize=(11 if red else 6, 4), squeeze=False)
    a = axes[0][0]
    for key in ("mean_cosine", "mean_identical_neurons", "mean_identical_to_dense", "mean_output_cka"):
        if any(v is not None for v in curves[key]):
            a.plot(curves["step"], curves[key], marker="o", label=key.removeprefix("mean_"))
    a.set_xlabel("step")
    a.set_title("expert similarity (mean over pairs and layers)")
    a.legend()
    if red:
        b = axes[0][1]
        for key in red:
            b.plot(curves["step"], curves[key], marker="o", label=key)
        b.set_xlabel("step")
        b.set_title("loss change without top-ranked experts (nats)")
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _f(v, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_report(record: dict) -> str:
    lines = ["# Expert diversity", "",
             "Means over expert pairs and MoE layers; see experts.json for the [E, E] matrices.", "",
             "| checkpoint | weight cosine | identical neurons | identical to dense | output CKA |",
             "|---|---|---|---|---|"]
    for c in record["checkpoints"]:
        s = c["summary"]
        lines.append(f"| {c['label']} | {_f(s['mean_cosine'])} | {_f(s['mean_identical_neurons'])} | "
                     f"{_f(s['mean_identical_to_dense'])} | {_f(s['mean_output_cka'])} |")
    if any(c["redundancy"] for c in record["checkpoints"]):
        lines += ["", "## Redundancy (loss change in nats when each token's top-ranked experts are removed)", "",
                  "| checkpoint | domain | loss | without rank 1 | without ranks 1-2 |", "|---|---|---|---|---|"]
        for c in record["checkpoints"]:
            for domain, r in (c["redundancy"] or {}).items():
                lines.append(f"| {c['label']} | {domain} | {_f(r['loss'])} | {_f(r['skip_1'], '+.4f')} | "
                             f"{_f(r['skip_2'], '+.4f')} |")
    if record["curves"]:
        lines += ["", "Over training: curves.png."]
    return "\n".join(lines) + "\n"
