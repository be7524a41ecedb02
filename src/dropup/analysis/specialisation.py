"""dropup analyze routing: how an MoE's routers divide the tokens of several domains among experts.

Each MoE model runs over the same fixed token sample per domain (the first ``tokens`` tokens of a
split, cut into non-overlapping windows of ``seq_len``; the last window may be shorter) and only
counts are kept (top-k assignments, pairs, repetitions, a token-id table), never per-token
records, so memory does not grow with the sample. The one exception is router saturation over a
run's checkpoints, which keeps the final checkpoint's top-k ids of the sample (one byte per id
when E <= 256: layers x tokens x k bytes) to compare the others with.

    from dropup.analysis.specialisation import RoutingOptions, analyze_routing
    result = analyze_routing(RoutingOptions(checkpoints=["moe/"], data=["code/", "prose/"], out="an/"))

The routing counts are the models' own: the softmax top-k of the router logits each MoE layer
computes (``MoE.take_router_logits``), with its selection bias where training gave it one; for Qwen2-MoE only the routed experts count (its shared
expert takes every token). The paper's Figure 5 quantity is ``shares``: each expert's fraction of
a domain's top-k assignments in a layer (uniform = 1/E).

``routing.json`` (format ``dropup-routing``, version 1); L = the model's MoE layers, D = domains,
E = experts, k = experts per token; domains are in ``domains`` order::

    format, version, split, seq_len, tokens_per_domain, dead_threshold (0.01), vocab_min_count (10)
    domains: [name]                   each dataset's meta.json "domain", else its directory name
    datasets: [path]
    models: [{
      name, path, model_type, num_experts E, top_k k, run (run directory or null), step (or null),
      layers: [L] layer indices (config numbering; a Qwen2-MoE dense layer has none)
      counts: [L][D][E]               top-k assignments per expert (integers)
      shares: [L][D][E]               counts / (tokens * k): sums to 1 per layer and domain
      rank1_shares: [L][D][E]         each expert's share of the tokens it is the first choice of
      jsd: [L], mean_jsd              generalised Jensen-Shannon divergence of the D share
                                      distributions, equal weights, nats: H(mean) - mean(H); 0 for
                                      identical domains, ln D at most (ln 2 for two disjoint ones)
      dead: [L][E] bool, dead_count: [L], dead_total
                                      share below dead_threshold in every domain
      concentration: [L][D]           share of the k busiest experts (k/E when uniform, 1 at most)
      entropy: [L][D]                 entropy of the shares / ln E (1 = uniform)
      max_mean: [L][D], jain: [L][D]  load imbalance: max share * E (1 = balanced) and Jain's
                                      index (sum s)^2 / (E sum s^2) (1 = balanced, 1/E = one expert)
      all_domains: {concentration, entropy, max_mean, jain: [L]}   of the domain-averaged shares
      coactivation: [L][E][E]         tokens whose top-k holds both experts i != j, all domains
                                      (symmetric, zero diagonal; the diagonal would be counts)
      repetition: {pairs: [D]         (t-1, t) pairs inside windows,
                   rank1_same: [L][D] fraction whose rank-1 expert of t equals that of t-1,
                   prev_rank1_in_topk: [L][D] fraction whose t-1 rank-1 expert is in t's top-k,
                   uniform_baseline: {rank1_same: 1/E, prev_rank1_in_topk: k/E},
                   shares_baseline: {rank1_same: [L][D], prev_rank1_in_topk: [L][D]}}
                     the shares baseline is what independent draws from the observed shares give:
                     sum_e r_e^2 and sum_e r_e * k * s_e (r = rank1_shares, s = shares)
      vocab: {layers: [layer indices counted], mean_top_share: [..], ids: [..]}
                     per token id (all domains pooled), the most frequent rank-1 expert's share of
                     that id's occurrences; mean over ids seen >= vocab_min_count times. The
                     [vocab, E] table per layer is kept for all layers while vocab * E * L stays
                     under 2^27 counts (512 MiB); beyond that only the figure's layers (--layers)
    }]
    saturation: [{run, steps: [C], final_step, overlap: [C][L], mean_overlap: [C]}]
                     for a run directory with >= 2 checkpoints: the mean over tokens of
                     |top-k(checkpoint) & top-k(final)| / k on the same tokens (1 = the final routing)
    figure_layers: {model name: [layer indices]}

Files in OUT: routing.json, report.md, shares.png (Figure 5 style), jsd.png, coactivation.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dropup.analysis.routing import topk_ids
from dropup.errors import UserError
from dropup.hub.atomic import atomic_dir
from dropup.hub.card import check_tokenizers
from dropup.hub.config import ModelConfig
from dropup.model.decoder import selection_biases
from dropup.options import Device, Precision, check_choices, check_ranges, ranged

FORMAT, VERSION = "dropup-routing", 1
DEAD_THRESHOLD = 0.01
VOCAB_MIN_COUNT = 10
VOCAB_BUDGET = 2**27  # [vocab, E] counts over all layers kept before restricting to figure layers
DEFAULT_SEQ_LEN = 1024


@dataclass
class RoutingOptions:
    checkpoints: list[str]
    data: list[str]
    out: str
    tokens: int = ranged(200_000, ge=2, integer=True, hint="tokens per domain")
    split: str = "val"
    seq_len: int | None = ranged(None, ge=2, integer=True)  # None: 1024 or the models' max positions
    batch_size: int = ranged(8, ge=1, integer=True)
    device: Device = "auto"
    dtype: Precision = "auto"
    layers: list[int] | None = None  # the figures' rows; None: up to 4 spread over depth
    allow_tokenizer_mismatch: bool = False
    overwrite: bool = False
    progress: bool = False

    def validate(self) -> None:
        check_choices(self)
        check_ranges(self)
        if not self.checkpoints:
            raise UserError("no checkpoint given: name at least one MoE checkpoint or run directory")
        if not self.data:
            raise UserError("no dataset given: pass --data DATASET ... (directories of `dropup data prepare`)")


# ---- pure metric functions (numpy, float64; last axis = experts) --------------------------------

def normalise(counts) -> np.ndarray:
    """Counts -> shares along the last axis (all zeros stay zeros)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(-1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def entropy(p) -> np.ndarray:
    """Shannon entropy in nats along the last axis, 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(-1)


def js_divergence(p) -> float:
    """Generalised Jensen-Shannon divergence (nats) of the rows of ``p`` [D, E] with equal
    weights: H(mean_d p_d) - mean_d H(p_d)."""
    p = np.asarray(p, dtype=np.float64)
    return float(max(0.0, entropy(p.mean(0)) - entropy(p).mean()))


def concentration(p, k: int) -> np.ndarray:
    """Share of the k largest entries along the last axis."""
    return np.sort(np.asarray(p, dtype=np.float64), axis=-1)[..., ::-1][..., :k].sum(-1)


def normalised_entropy(p) -> np.ndarray:
    return entropy(p) / math.log(np.shape(p)[-1])


def max_mean(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p.max(-1) / p.mean(-1)


def jain_index(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p.sum(-1) ** 2 / (p.shape[-1] * (p**2).sum(-1))


def dead_experts(shares, threshold: float = DEAD_THRESHOLD) -> np.ndarray:
    """[..., D, E] -> [..., E]: experts below ``threshold`` in every domain."""
    return (np.asarray(shares) < threshold).all(-2)


def vocab_specialisation(table, min_count: int = VOCAB_MIN_COUNT) -> tuple[float | None, int]:
    """(mean over token ids seen >= min_count times of the most frequent expert's share, ids)."""
    t = np.asarray(table, dtype=np.float64)
    n = t.sum(-1)
    seen = n >= min_count
    if not seen.any():
        return None, 0
    return float((t[seen].max(-1) / n[seen]).mean()), int(seen.sum())


def repetition_baselines(rank1_shares, shares, k: int) -> dict[str, np.ndarray]:
    """What independent draws from the observed shares give: P(same rank-1) = sum r_e^2 and
    P(rank-1 of t-1 in top-k of t) = sum r_e * P(e in top-k) = sum r_e * k * s_e."""
    r, s = np.asarray(rank1_shares, dtype=np.float64), np.asarray(shares, dtype=np.float64)
    return {"rank1_same": (r**2).sum(-1), "prev_rank1_in_topk": (r * k * s).sum(-1)}


def default_layers(layers: list[int], n: int = 4) -> list[int]:
    """Up to n layers spread evenly over depth, first and last included."""
    if len(layers) <= n:
        return list(layers)
    return [layers[round(i * (len(layers) - 1) / (n - 1))] for i in range(n)]


# ---- counting over a model ---------------------------------------------------------------------

class RoutingCounts:
    """Per-layer routing counts of one model over the domains, accumulated batch by batch."""

    def __init__(self, layers: int, domains: int, num_experts: int, top_k: int, vocab_size: int,
                 vocab_layers: list[int], device):
        L, D, E = layers, domains, num_experts
        z = lambda *s: torch.zeros(*s, dtype=torch.int64, device=device)  # noqa: E731
        self.k, self.E = top_k, E
        self.counts, self.rank1 = z(L, D, E), z(L, D, E)
        self.coact = z(L, E, E)
        self.same, self.in_topk, self.pairs = z(L, D), z(L, D), z(D)
        # int32 suffices for the counts of one token id and halves the largest table.
        self.vocab = {l: torch.zeros(vocab_size, E, dtype=torch.int32, device=device) for l in vocab_layers}

    def add(self, d: int, input_ids: torch.Tensor, ids_per_layer: list[torch.Tensor]) -> None:
        """Count one batch of domain d: ``ids_per_layer`` [B * T, k] top-k ids per MoE layer."""
        b, t = input_ids.shape
        flat = input_ids.reshape(-1)
        self.pairs[d] += b * (t - 1)
        for l, ids in enumerate(ids_per_layer):
            self.counts[l, d] += torch.bincount(ids.reshape(-1), minlength=self.E)
            self.rank1[l, d] += torch.bincount(ids[:, 0], minlength=self.E)
            hot = torch.zeros(ids.shape[0], self.E, device=ids.device).scatter_(1, ids, 1.0)
            # fp32 matmul is exact here: a batch's pair counts stay far below 2^24
            co = (hot.T @ hot).round().long()
            self.coact[l] += co - torch.diag(torch.diagonal(co))
            r = ids.view(b, t, self.k)
            prev, cur = r[:, :-1, 0], r[:, 1:]
            self.same[l, d] += (cur[..., 0] == prev).sum()
            self.in_topk[l, d] += (cur == prev[..., None]).any(-1).sum()
            if l in self.vocab:
                self.vocab[l].index_put_((flat, ids[:, 0]), torch.ones_like(flat, dtype=torch.int32),
                                         accumulate=True)


def _domain_batches(tokens: np.ndarray, seq_len: int, batch_size: int):
    """The sample as [B, T] int64 batches: full windows, then the shorter last one alone."""
    n_full = len(tokens) // seq_len
    full = tokens[: n_full * seq_len].reshape(n_full, seq_len)
    for i in range(0, n_full, batch_size):
        yield torch.from_numpy(np.ascontiguousarray(full[i : i + batch_size], dtype=np.int64))
    if len(tokens) % seq_len >= 2:  # a single-token window has no pairs and is dropped
        yield torch.from_numpy(np.asarray(tokens[n_full * seq_len :], dtype=np.int64))[None]


def sample_size(tokens: int, seq_len: int) -> int:
    """Tokens actually routed per domain (a trailing single token is dropped)."""
    return tokens - (1 if tokens % seq_len == 1 else 0)


@torch.inference_mode()
def route_model(model, samples: list[np.ndarray], seq_len: int, batch_size: int,
                vocab_layers: list[int], reference: list[torch.Tensor] | None = None,
                keep_ids: bool = False) -> tuple[RoutingCounts, list[torch.Tensor] | None, np.ndarray | None]:
    """Run ``model`` over each domain's sample and count its routing.

    Returns the counts, with ``keep_ids`` the top-k ids of every token per layer ([N, k] uint8 or
    int16 on the CPU, domains in order), and with ``reference`` (such ids from another checkpoint
    of the same shape) the top-k overlap per layer, mean over tokens of |A & B| / k."""
    cfg = model.config
    device = next(model.parameters()).device
    moe_layers = cfg.moe_layers
    counts = RoutingCounts(len(moe_layers), len(samples), cfg.num_experts, cfg.num_experts_per_tok,
                           cfg.vocab_size, [moe_layers.index(l) for l in vocab_layers], device)
    kept: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    overlap = torch.zeros(len(moe_layers), dtype=torch.float64, device=device)
    pos, id_dtype = 0, torch.uint8 if cfg.num_experts <= 256 else torch.int16
    biases = selection_biases(model)  # a model trained with aux-loss-free balancing routes with them
    for d, tokens in enumerate(samples):
        for batch in _domain_batches(tokens, seq_len, batch_size):
            batch = batch.to(device)
            _, logits = model.hidden_states(batch)
            ids = [topk_ids(x, cfg.num_experts_per_tok, b) for x, b in zip(logits, biases)]
            counts.add(d, batch, ids)
            n = batch.numel()
            for l, x in enumerate(ids):
                if keep_ids:
                    kept[l].append(x.to("cpu", id_dtype))
                if reference is not None:
                    ref = reference[l][pos : pos + n].to(device, torch.int64)
                    overlap[l] += (x[:, :, None] == ref[:, None, :]).any(-1).sum()
            pos += n
    ov = (overlap / (pos * cfg.num_experts_per_tok)).cpu().numpy() if reference is not None else None
    return counts, ([torch.cat(k) for k in kept] if keep_ids else None), ov


def summarise(counts: RoutingCounts, layers: list[int], vocab_layers: list[int]) -> dict:
    """The routing.json arrays of one model from its counts (schema in the module docstring)."""
    c = counts.counts.cpu().numpy()
    shares, rank1 = normalise(c), normalise(counts.rank1.cpu().numpy())
    k, E = counts.k, counts.E
    dead = dead_experts(shares)
    pooled = shares.mean(1)
    pairs = counts.pairs.cpu().numpy().astype(np.float64)
    frac = lambda x: np.divide(x.cpu().numpy(), pairs, out=np.zeros(x.shape), where=pairs > 0)  # noqa: E731
    base = repetition_baselines(rank1, shares, k)
    vocab = [vocab_specialisation(counts.vocab[layers.index(l)].cpu().numpy()) for l in vocab_layers]
    jsd = [js_divergence(s) for s in shares]
    return {
        "num_experts": E, "top_k": k, "layers": layers,
        "counts": c.tolist(), "shares": shares.tolist(), "rank1_shares": rank1.tolist(),
        "jsd": jsd,
        "mean_jsd": float(np.mean(jsd)),
        "dead": dead.tolist(), "dead_count": dead.sum(-1).tolist(), "dead_total": int(dead.sum()),
        "concentration": concentration(shares, k).tolist(), "entropy": normalised_entropy(shares).tolist(),
        "max_mean": max_mean(shares).tolist(), "jain": jain_index(shares).tolist(),
        "all_domains": {"concentration": concentration(pooled, k).tolist(),
                        "entropy": normalised_entropy(pooled).tolist(),
                        "max_mean": max_mean(pooled).tolist(), "jain": jain_index(pooled).tolist()},
        "coactivation": counts.coact.cpu().numpy().tolist(),
        "repetition": {"pairs": pairs.astype(int).tolist(), "rank1_same": frac(counts.same).tolist(),
                       "prev_rank1_in_topk": frac(counts.in_topk).tolist(),
                       "uniform_baseline": {"rank1_same": 1 / E, "prev_rank1_in_topk": k / E},
                       "shares_baseline": {n: v.tolist() for n, v in base.items()}},
        "vocab": {"layers": vocab_layers, "mean_top_share": [v[0] for v in vocab], "ids": [v[1] for v in vocab]},
    }


# ---- inputs ------------------------------------------------------------------------------------

@dataclass
class _Model:
    name: str
    path: Path
    cfg: ModelConfig
    run: Path | None = None
    step: int | None = None


def resolve_checkpoints(paths: list[str]) -> list[_Model]:
    """Models to analyse: checkpoint directories as given; a run directory's checkpoints
    (``ckpt/step_N/model``) oldest first. ``UserError`` for anything else or a dense model."""
    from dropup.model.io import load_config
    from dropup.train.checkpoints import model_refs

    found = [_Model(r.label, r.path, load_config(r.path), r.run, r.step) for r in model_refs(paths)]
    for m in found:
        if not m.cfg.is_moe:
            raise UserError(f"{m.path} is a dense model ({m.cfg.model_type}), not an MoE: it has no routing to "
                            "analyse; use `dropup eval` for its loss")
    return found


def _domain_name(path: Path, meta: dict) -> str:
    d = meta.get("domain")
    return d if isinstance(d, str) and d else path.resolve().name


def read_samples(opts: RoutingOptions, models: list[_Model]) -> tuple[list[str], list[np.ndarray]]:
    """Domain names and each domain's first ``opts.tokens`` tokens, checked against the models."""
    from dropup.data.tokens import TokenFile

    names, samples = [], []
    for ds in opts.data:
        f = TokenFile(ds, opts.split)
        if len(f) < opts.tokens:
            raise UserError(f"dataset {ds} has {len(f)} tokens in its {opts.split!r} split, fewer than "
                            f"--tokens {opts.tokens}; pass --tokens {len(f)} or less, or more data")
        for m in models:
            f.check_vocab(m.cfg.vocab_size, f"model {m.path}'s")
        name = _domain_name(Path(ds), f.meta)
        if name in names:
            raise UserError(f"datasets {opts.data[names.index(name)]} and {ds} are both domain {name!r}; "
                            "each dataset must be its own domain (set a domain in `dropup data prepare --domain`)")
        names.append(name)
        samples.append(np.asarray(f.tokens[: opts.tokens]))
    if not opts.allow_tokenizer_mismatch:
        for m in models:
            try:
                check_tokenizers(m.path, opts.data)
            except UserError as e:
                # check_tokenizers words it for a run's model.init; here the model is analysed
                first = str(e).split(";")[0].replace("model.init ", "model ", 1)
                raise UserError(f"{first}; the token ids would mean other text to the "
                                f"model: prepare the data with its tokenizer or pass --allow-tokenizer-mismatch") from None
    return names, samples


def _seq_len(opts: RoutingOptions, models: list[_Model]) -> int:
    limit = min(m.cfg.max_position_embeddings for m in models)
    if opts.seq_len is None:
        return min(DEFAULT_SEQ_LEN, limit)
    if opts.seq_len > limit:
        raise UserError(f"--seq-len {opts.seq_len} is longer than a model's max_position_embeddings "
                        f"({limit}); pass --seq-len {limit} or less")
    return opts.seq_len


def _moe_layers(cfg: ModelConfig) -> list[int]:
    return cfg.moe_layers


def _figure_layers(opts: RoutingOptions, m: _Model) -> list[int]:
    layers = _moe_layers(m.cfg)
    if opts.layers is None:
        return default_layers(layers)
    bad = [l for l in opts.layers if l not in layers]
    if bad:
        raise UserError(f"--layers {bad[0]} is not an MoE layer of {m.path} (its MoE layers: "
                        f"{layers[0]} to {layers[-1]}{'' if len(layers) == layers[-1] - layers[0] + 1 else ', some dense'})")
    return list(opts.layers)


def _vocab_layers(m: _Model, figure: list[int]) -> list[int]:
    layers = _moe_layers(m.cfg)
    if m.cfg.vocab_size * m.cfg.num_experts * len(layers) <= VOCAB_BUDGET:
        return layers
    return figure


# ---- the analysis ------------------------------------------------------------------------------

def _route_all(opts: RoutingOptions, models: list[_Model], samples: list[np.ndarray], seq_len: int,
               figure: dict[str, list[int]], device, dtype) -> tuple[list[dict], list[dict]]:
    """Each model's summary (in the order given) and the saturation of each run with >= 2
    checkpoints. One model is in memory at a time."""
    from dropup.model.io import load_model

    saturation = []
    # The final checkpoint of a run goes first: the others are compared with its routing.
    runs: dict[Path, list[_Model]] = {}
    for m in models:
        if m.run is not None:
            runs.setdefault(m.run, []).append(m)
    finals = {id(v[-1]): v[-1] for v in runs.values() if len(v) > 1}
    order = [m for m in models if id(m) in finals] + [m for m in models if id(m) not in finals]
    reference: dict[Path, list[torch.Tensor]] = {}
    overlaps: dict[int, np.ndarray] = {}
    by_id = {}
    for m in order:
        if opts.progress:
            print(f"dropup analyze routing: {m.name}", flush=True)
        model = load_model(m.path, device=device, dtype=dtype).eval()
        ref = reference.get(m.run) if m.run is not None and id(m) not in finals else None
        counts, ids, ov = route_model(model, samples, seq_len, opts.batch_size, _vocab_layers(m, figure[m.name]),
                                      reference=ref, keep_ids=id(m) in finals)
        del model
        if ids is not None:
            reference[m.run] = ids
        if ov is not None:
            overlaps[id(m)] = ov
        by_id[id(m)] = {"name": m.name, "path": str(m.path), "model_type": m.cfg.model_type,
                        "run": str(m.run) if m.run else None, "step": m.step,
                        **summarise(counts, _moe_layers(m.cfg), _vocab_layers(m, figure[m.name]))}
    results = [by_id[id(m)] for m in models]
    for run, ms in runs.items():
        if len(ms) < 2:
            continue
        ov = [overlaps[id(m)].tolist() if id(m) in overlaps else [1.0] * len(_moe_layers(m.cfg)) for m in ms]
        saturation.append({"run": str(run), "steps": [m.step for m in ms], "final_step": ms[-1].step,
                           "overlap": ov, "mean_overlap": [float(np.mean(o)) for o in ov]})
    return results, saturation


def analyze_routing(opts: RoutingOptions) -> dict:
    """Run the routing analysis and write OUT (routing.json, report.md, the figures); returns
    what routing.json holds. Every input is checked before anything is computed or written."""
    from dropup.analysis import plots

    opts = dataclasses.replace(opts, checkpoints=[str(c) for c in opts.checkpoints],
                               data=[str(d) for d in opts.data])
    opts.validate()
    models = resolve_checkpoints(opts.checkpoints)
    domains, samples = read_samples(opts, models)
    seq_len = _seq_len(opts, models)
    figure = {m.name: _figure_layers(opts, m) for m in models}
    from dropup.model.io import runtime

    device, dtype = runtime(opts.device, opts.dtype)
    protect = [("CKPT", m.path) for m in models] + [("DATASET", d) for d in opts.data]
    t0 = time.perf_counter()
    with atomic_dir(opts.out, existing="replace" if opts.overwrite else "refuse", label="--out",
                    advice="choose another path or pass --overwrite", protect=protect) as tmp:
        results, saturation = _route_all(opts, models, samples, seq_len, figure, device, dtype)
        out = {"format": FORMAT, "version": VERSION, "split": opts.split, "seq_len": seq_len,
               "tokens_per_domain": sample_size(opts.tokens, seq_len), "dead_threshold": DEAD_THRESHOLD,
               "vocab_min_count": VOCAB_MIN_COUNT, "domains": domains, "datasets": opts.data,
               "device": str(device), "dtype": str(dtype).removeprefix("torch."),
               "seconds": round(time.perf_counter() - t0, 3),
               "models": results, "saturation": saturation, "figure_layers": figure}
        (tmp / "routing.json").write_text(json.dumps(out, indent=1) + "\n")
        plots.share_grid(out, tmp / "shares.png")
        plots.jsd_by_layer(out, tmp / "jsd.png")
        plots.coactivation(out, tmp / "coactivation.png")
        if saturation:
            plots.saturation(out, tmp / "saturation.png")
        (tmp / "report.md").write_text(report_markdown(out))
    return out


def _fmt(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def comparison_rows(result: dict) -> list[dict]:
    """One row per model of the report's table: means over layers (and domains)."""
    rows = []
    for m in result["models"]:
        vt = [v for v in m["vocab"]["mean_top_share"] if v is not None]
        rep, base = m["repetition"], m["repetition"]["shares_baseline"]
        rows.append({"model": m["name"], "mean_jsd": m["mean_jsd"], "dead": m["dead_total"],
                     "slots": len(m["layers"]) * m["num_experts"],
                     "concentration": float(np.mean(m["concentration"])),
                     "entropy": float(np.mean(m["entropy"])), "max_mean": float(np.mean(m["max_mean"])),
                     "jain": float(np.mean(m["jain"])), "rank1_same": float(np.mean(rep["rank1_same"])),
                     "rank1_same_baseline": float(np.mean(base["rank1_same"])),
                     "vocab": float(np.mean(vt)) if vt else None,
                     "E": m["num_experts"], "k": m["top_k"]})
    return rows


def comparison_table(result: dict) -> str:
    """The models side by side (markdown): what report.md and the demo print."""
    rows = comparison_rows(result)
    lines = [
        "| model | E, k | mean JSD (nats) | dead experts | top-k concentration | entropy / ln E "
        "| max/mean | Jain | rank-1 repeat (baseline) | vocab specialisation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['E']}, {r['k']} | {_fmt(r['mean_jsd'])} | {r['dead']} / {r['slots']} "
                     f"| {_fmt(r['concentration'])} | {_fmt(r['entropy'])} | {_fmt(r['max_mean'], 2)} "
                     f"| {_fmt(r['jain'])} | {_fmt(r['rank1_same'])} ({_fmt(r['rank1_same_baseline'])}) "
                     f"| {_fmt(r['vocab'])} |")
    return "\n".join(lines)


def report_markdown(result: dict) -> str:
    lines = [
        "# Routing analysis", "",
        f"Domains: {', '.join(result['domains'])}; {result['tokens_per_domain']} tokens each "
        f"({result['split']} split, windows of {result['seq_len']}).", "",
        comparison_table(result),
    ]
    if result["saturation"]:
        lines += ["", "## Router saturation", "",
                  "Mean top-k overlap with the final checkpoint's routing on the same tokens (1 = final).", "",
                  "| run | step | overlap |", "|---|---|---|"]
        for s in result["saturation"]:
            lines += [f"| {s['run']} | {st} | {_fmt(o)} |" for st, o in zip(s["steps"], s["mean_overlap"])]
    lines += ["", "## Per layer", "",
              "Domain-averaged shares; dead = experts below 1% in every domain.", ""]
    for m in result["models"]:
        lines += [f"### {m['name']}", "", "| layer | JSD | dead | concentration | entropy / ln E | max/mean |",
                  "|---|---|---|---|---|---|"]
        a = m["all_domains"]
        lines += [f"| {l} | {_fmt(m['jsd'][i])} | {m['dead_count'][i]} | {_fmt(a['concentration'][i])} "
                  f"| {_fmt(a['entropy'][i])} | {_fmt(a['max_mean'][i], 2)} |" for i, l in enumerate(m["layers"])]
        lines.append("")
    lines += ["", "![expert shares per domain](shares.png)", "", "![JSD per layer](jsd.png)", "",
              "![co-activation](coactivation.png)"]
    if result["saturation"]:
        lines += ["", "![router saturation](saturation.png)"]
    lines += [
        "", "## How to read it", "",
        "- **shares.png** (the paper's Figure 5): for each chosen layer (rows) and model (columns), each "
        "expert's share of the top-k assignments per domain; the dashed line is the uniform 1/E. Bars that "
        "differ by domain mean the router sends domains to different experts (specialisation); a few tall "
        "bars alike for every domain mean collapse onto interchangeable experts (naive upcycling).",
        "- **mean JSD**: how different the domains' routing distributions are (0 = identical, ln D at most).",
        "- **dead experts**: layer-expert slots below a 1% share in every domain.",
        "- **top-k concentration**: share of the k busiest experts (k/E when balanced); **entropy / ln E**: "
        "1 when balanced; **max/mean** and **Jain**: load imbalance (1 = balanced).",
        "- **rank-1 repeat**: how often a token's first expert equals the previous token's, against the "
        "rate independent draws from the observed shares give (in brackets; 1/E when uniform).",
        "- **vocab specialisation**: per token id, the share of its most frequent rank-1 expert, averaged "
        f"over ids seen at least {result['vocab_min_count']} times (1 = every id always goes to one expert).",
        "- **jsd.png**: JSD per layer; **coactivation.png**: how often two experts share a token's top-k.",
        "",
    ]
    return "\n".join(lines)
