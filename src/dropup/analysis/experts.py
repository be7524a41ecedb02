"""`dropup inspect`: what an MoE checkpoint is, how it was built, and how alike its experts are.

Expert similarity is computed one layer and one block of neurons at a time, so inspecting a
checkpoint needs memory for a block, not for the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dropup.convert import surgery
from dropup.convert.methods import METHODS
from dropup.errors import UserError
from dropup.hub import names as archs
from dropup.hub.config import ModelConfig
from dropup.hub.safetensors import CheckpointReader

NEURON_BLOCK = 512


def _moe_config(ck: CheckpointReader) -> ModelConfig:
    cfg = ModelConfig.from_hf(ck.config, where=f"inspect: {ck.path}")
    if not cfg.is_moe:
        raise UserError(f"inspect: model_type {cfg.model_type!r} is not an MoE dropup knows; expected one "
                        f"of {', '.join(archs.TARGET_TYPES)}")
    return cfg


def _fingerprints(blocks: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """One int64 per neuron that changes when any of the neuron's bits change.

    Bit patterns are summed with random odd multipliers modulo 2^64; two different neurons collide
    with probability about 2^-64, so equal fingerprints mean bit-identical neurons.
    """
    bits = torch.cat([b.contiguous().view(_int_dtype(b.dtype)).to(torch.int64) for b in blocks], dim=1)
    return (bits * weights[: bits.shape[1]]).sum(dim=1)


def _int_dtype(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def expert_similarity(ck: CheckpointReader, target: str, layer: int, num_experts: int) -> dict:
    """Mean pairwise cosine similarity of the experts' weights, and the mean fraction of neurons
    that are bit-identical between two experts (1.0 for naive upcycling, about (1-r)^2 for drop)."""
    names = {(e, m): archs.expert_name(target, layer, e, m)
             for e in range(num_experts) for m in surgery.FFN_MATRICES}
    if any(n not in ck.tensors for n in names.values()):
        raise UserError(f"inspect: {ck.path} does not store per-expert tensors for layer {layer}")
    mats = {k: ck.get(n) for k, n in names.items()}
    d_f = mats[(0, "gate")].shape[0]
    hidden = mats[(0, "gate")].shape[1]
    gram = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    same = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 2**62, (3 * hidden,), generator=gen, dtype=torch.int64) * 2 + 1
    for start in range(0, d_f, NEURON_BLOCK):
        stop = min(d_f, start + NEURON_BLOCK)
        rows, prints = [], []
        for e in range(num_experts):
            parts = [mats[(e, "gate")][start:stop], mats[(e, "up")][start:stop],
                     mats[(e, "down")][:, start:stop].t()]
            prints.append(_fingerprints(parts, weights))
            rows.append(torch.cat([p.reshape(-1) for p in parts]).to(torch.float64))
        x = torch.stack(rows)
        gram += x @ x.t()
        fp = torch.stack(prints)  # [E, block]
        same += (fp[:, None, :] == fp[None, :, :]).sum(-1).to(torch.float64)
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    cos = gram / (norms[:, None] * norms[None, :])
    off = ~torch.eye(num_experts, dtype=torch.bool)
    return {
        "layer": layer,
        "mean_cosine": cos[off].mean().item(),
        "min_cosine": cos[off].min().item(),
        "mean_identical_neurons": (same[off] / d_f).mean().item(),
    }


def inspect_checkpoint(path: str | Path, similarity: bool = True) -> dict:
    ck = CheckpointReader(path, "checkpoint")
    cfg = _moe_config(ck)
    target, num_experts, top_k, layers = cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    total = sum(math.prod(info.shape) for info in ck.tensors.values())
    if cfg.tie_word_embeddings and "lm_head.weight" in ck.tensors:
        total -= math.prod(ck.tensors["lm_head.weight"].shape)
    per_expert = 0
    for m in surgery.FFN_MATRICES:
        name = archs.expert_name(target, 0, 0, m)
        if name in ck.tensors:
            per_expert += math.prod(ck.tensors[name].shape)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(layers))
    active = total - moe_layers * (num_experts - top_k) * per_expert
    report: dict = {
        "path": str(ck.path), "architecture": target, "layers": layers,
        "hidden_size": cfg.hidden_size, "expert_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": num_experts, "top_k": top_k,
        "total_params": total, "active_params": active,
        "dtype": ck.config.get("torch_dtype") or ck.config.get("dtype"),
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "shared_expert": cfg.shared_expert_intermediate_size > 0,
    }
    prov_path = ck.path / "upcycling.json"
    if prov_path.is_file():
        prov = json.loads(prov_path.read_text())
        o = prov["options"]
        intact = [x.get("intact_fraction", float("nan")) for layer in prov["layers"] for x in layer]
        report["upcycling"] = {
            "method": o["method"], "ratio": o["ratio"] if METHODS[o["method"]].uses_ratio else None,
            "index_sampling": o["index_sampling"], "reinit_stats": o["reinit_stats"],
            "router_init": o["router_init"], "seed": o["seed"], "dropup_version": prov["dropup_version"],
            "source": prov["source"]["path"], "source_type": prov["source"]["config"].get("model_type"),
            "intact_fraction_mean": sum(intact) / len(intact),
            "intact_fraction_min": min(intact), "intact_fraction_max": max(intact),
        }
    if similarity:
        report["similarity"] = [expert_similarity(ck, target, i, num_experts) for i in range(layers)]
    return report


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return str(n)


def format_report(r: dict) -> str:
    lines = [
        f"checkpoint   {r['path']}",
        f"architecture {r['architecture']}  ({r['layers']} layers, hidden {r['hidden_size']}, "
        f"expert d_f {r['expert_intermediate_size']}, dtype {r['dtype']})",
        f"experts      {r['num_experts']} routed, top-{r['top_k']}"
        + (", plus a shared expert" if r["shared_expert"] else "")
        + f"; aux-loss coefficient {r['router_aux_loss_coef']}",
        f"parameters   {_human(r['total_params'])} total, {_human(r['active_params'])} active per token",
    ]
    u = r.get("upcycling")
    if u:
        method = u["method"] + (f" (r = {u['ratio']}, {u['index_sampling']} indices, "
                                f"{u['reinit_stats']} statistics)" if u["ratio"] is not None else "")
        lines += [
            f"method       {method}; router {u['router_init']}; seed {u['seed']}",
            f"source       {u['source']} ({u['source_type']}); dropup {u['dropup_version']}",
            f"intact       {u['intact_fraction_mean']:.4f} of each expert's neurons untouched "
            f"(min {u['intact_fraction_min']:.4f}, max {u['intact_fraction_max']:.4f})",
        ]
    if "similarity" in r:
        lines.append("layer  mean cos  min cos  identical neurons (mean over expert pairs)")
        for s in r["similarity"]:
            lines.append(f"{s['layer']:>5}  {s['mean_cosine']:8.4f} {s['min_cosine']:8.4f}  "
                         f"{s['mean_identical_neurons']:.4f}")
    return "\n".join(lines)
