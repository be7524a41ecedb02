"""`dropup inspect`: what an MoE checkpoint is, how it was built, and how alike its experts are.

Expert similarity is computed one layer and one block of neurons at a time, so inspecting a
checkpoint needs memory for one block (at most SIMILARITY_BUDGET float32 values; the weights
themselves are memory-mapped), not for the model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dropup.convert import ratios, surgery
from dropup.convert.methods import METHODS
from dropup.convert.upcycle import check_ratio
from dropup.errors import UserError
from dropup.hub import names as archs
from dropup.hub.card import parameter_counts
from dropup.hub.config import ModelConfig
from dropup.hub.safetensors import CheckpointReader, json_type

# Elements of one layer's experts compared at once (float32: 256 MB); SmolLM2-135M x 8 fits whole.
SIMILARITY_BUDGET = 64 << 20


def _moe_config(ck: CheckpointReader) -> ModelConfig:
    cfg = ModelConfig.from_hf(ck.config, where=f"inspect: {ck.path}")
    if cfg.model_type not in archs.TARGET_TYPES:
        raise UserError(f"inspect: model_type {cfg.model_type!r} is not an MoE dropup knows; expected one "
                        f"of {', '.join(archs.TARGET_TYPES)}")
    try:
        cfg.validate()  # e.g. top-k within the expert count: the similarity loops rely on it
    except UserError as e:
        raise UserError(f"inspect: {ck.path / 'config.json'}: {e}") from None
    return cfg


def _int_dtype(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def _check_experts(ck: CheckpointReader, layer: int, found: dict[tuple[int, str], tuple[str, tuple, torch.dtype]]) -> None:
    """Experts are compared block by block, which needs one shape for all of them, and by bit
    fingerprints, which need floats of 2, 4 or 8 bytes: anything else would fail inside torch.
    ``found``: (expert, matrix) -> (what it is called, shape, dtype)."""
    gate = found[(0, "gate")][1]
    d_f, hidden = gate if len(gate) == 2 else (0, 0)
    expected = {"gate": (d_f, hidden), "up": (d_f, hidden), "down": (hidden, d_f)}
    for (_, m), (n, shape, dtype) in found.items():
        if tuple(shape) != expected[m] or not d_f or not hidden:
            raise UserError(f"inspect: {ck.path}: {n} has shape {list(shape)}, but expert 0 of layer "
                            f"{layer} has a gate of shape {list(gate)}; the checkpoint is malformed")
        if not dtype.is_floating_point or dtype.itemsize not in (2, 4, 8):
            raise UserError(f"inspect: {ck.path}: {n} is {str(dtype).removeprefix('torch.')}, "
                            "not a floating-point weight; the checkpoint is malformed")


def _layer_experts(ck: CheckpointReader, target: str, layer: int, num_experts: int) -> dict[str, list[torch.Tensor]]:
    """Each matrix of every expert of one layer (index = expert), checked, in either Hub layout:
    one tensor per expert and matrix, or GraniteMoE's tensors stacking all experts."""
    fused = archs.fused_experts(target, layer)
    if not fused:
        names = {(e, m): archs.expert_name(target, layer, e, m)
                 for e in range(num_experts) for m in surgery.FFN_MATRICES}
        if any(n not in ck.tensors for n in names.values()):
            raise UserError(f"inspect: {ck.path} does not store per-expert tensors for layer {layer}")
        _check_experts(ck, layer, {k: (n, ck.tensors[n].shape, ck.tensors[n].dtype) for k, n in names.items()})
        return {m: [ck.get(names[(e, m)]) for e in range(num_experts)] for m in surgery.FFN_MATRICES}
    found, stacks = {}, {}
    for name, matrices in fused.items():
        info = ck.tensors.get(name)
        if info is None or len(info.shape) != 3 or info.shape[0] != num_experts or info.shape[1] % len(matrices):
            raise UserError(f"inspect: {ck.path} has no {name} of shape [{num_experts}, "
                            f"{len(matrices)} x d_f or d_h, ...] for layer {layer}")
        stacks[name] = ck.get(name)
        for m in matrices:
            shape = archs.expert_matrix(torch.empty(info.shape, device="meta"), matrices, m).shape[1:]
            found.update({(e, m): (f"{name} ({m} of expert {e})", shape, info.dtype) for e in range(num_experts)})
    _check_experts(ck, layer, found)
    return {m: list(archs.expert_matrix(stacks[name], matrices, m).unbind(0))
            for name, matrices in fused.items() for m in matrices}


@dataclass(frozen=True)
class LayerSimilarity:
    """How alike one layer's experts are, as full matrices (index = expert)."""

    cosine: torch.Tensor  # [E, E] float64: cosine similarity of the experts' flattened weights
    identical: torch.Tensor  # [E, E] float64: fraction of neurons bit-identical between two experts
    identical_to_dense: torch.Tensor | None  # [E]: fraction bit-identical to the dense FFN, if given


def _fingerprint_weights(hidden: int) -> dict[str, torch.Tensor]:
    """Random odd multipliers for neuron fingerprints: sum_i w_i * bits_i modulo 2^64 over a
    neuron's elements. Two different neurons collide with probability at most 2^-(63 - v), v the
    lowest set bit of their bit difference (v < 32 for 4-byte bits): equal fingerprints mean
    bit-identical neurons."""
    gen = torch.Generator().manual_seed(0)
    return {m: torch.randint(1, 2**62, (hidden,), generator=gen, dtype=torch.int64) * 2 + 1
            for m in surgery.FFN_MATRICES}


def _to_float32(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[...] = src`` for a float32 ``dst``, exactly."""
    if src.dtype == torch.bfloat16:
        # bf16 is the upper half of an fp32: numpy's shift of the bits is about ten times faster
        # than torch's CPU conversion, which dominated the similarity pass.
        np.left_shift(src.view(torch.int16).numpy(), 16, out=dst.numpy().view(np.int32),
                      dtype=np.int32, casting="unsafe")
    else:
        dst.copy_(src)


def layer_similarity(ck: CheckpointReader, target: str, layer: int, num_experts: int,
                     dense: dict[str, torch.Tensor] | None = None) -> LayerSimilarity:
    """Cosine similarity and bit-identical neurons for every pair of one layer's experts.

    A neuron is a row of gate and up and the matching column of down. ``dense`` (gate, up and
    down of the dense FFN) adds each expert's fraction of neurons identical to it, position by
    position; it is cast to the experts' dtype first, as the converter casts it.

    All experts are handled together, a block of neurons at a time (all of them for models of
    SmolLM2's size): one float32 matrix product per matrix and block gives every pair's dot
    products, and each expert's neurons are fingerprinted once, not once per pair. The buffers
    are reused across blocks and matrices: on a small machine, fresh allocations (page faults)
    cost more than the arithmetic.
    """
    mats = _layer_experts(ck, target, layer, num_experts)
    dtype = mats["gate"][0].dtype
    if dense is not None:
        for m in surgery.FFN_MATRICES:
            mats[m].append(dense[m].to(dtype))
    n = len(mats["gate"])
    d_f, hidden = mats["gate"][0].shape
    weights = _fingerprint_weights(hidden)
    block = max(1, min(d_f, SIMILARITY_BUDGET // (n * hidden)))
    flat = torch.empty(n, block * hidden, dtype=torch.float32)
    bits = torch.empty(block * hidden, dtype=torch.int64)
    gram = torch.zeros(n, n, dtype=torch.float64)
    same = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, d_f, block):
        stop = min(d_f, start + block)
        size = (stop - start) * hidden
        prints = torch.zeros(n, stop - start, dtype=torch.int64)
        for m in surgery.FFN_MATRICES:
            for e, t in enumerate(mats[m]):
                part = t[:, start:stop] if m == "down" else t[start:stop]
                f32 = flat[e, :size].view(part.shape)
                _to_float32(part, f32)
                b = bits[:size].view(part.shape)
                # bf16 and fp16 widen to fp32 exactly and one-to-one, so the float32 copy's bits
                # identify a neuron as well as the originals and save a second slow conversion.
                b.copy_(part.view(torch.int64) if dtype.itemsize == 8 else f32.view(torch.int32))
                # down's neurons are columns: weight by row, sum over rows
                prints[e] += (b.mul_(weights[m][:, None]) if m == "down" else b.mul_(weights[m])).sum(
                    0 if m == "down" else 1)
            x = flat[:, :size]
            gram += (x @ x.t()).double()
        same += (prints[:, None, :] == prints[None, :, :]).sum(-1).to(torch.float64)
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    cos = gram / (norms[:, None] * norms[None, :])
    same /= d_f
    e = num_experts
    return LayerSimilarity(cosine=cos[:e, :e], identical=same[:e, :e],
                           identical_to_dense=same[e, :e].clone() if dense is not None else None)


def expert_similarity(ck: CheckpointReader, target: str, layer: int, num_experts: int) -> dict:
    """Mean pairwise cosine similarity of the experts' weights, and the mean fraction of neurons
    that are bit-identical between two experts (1.0 for naive upcycling, about (1-r)^2 for drop)."""
    s = layer_similarity(ck, target, layer, num_experts)
    off = ~torch.eye(num_experts, dtype=torch.bool)
    return {
        "layer": layer,
        "mean_cosine": s.cosine[off].mean().item(),
        "min_cosine": s.cosine[off].min().item(),
        "mean_identical_neurons": s.identical[off].mean().item(),
    }


def inspect_checkpoint(path: str | Path, similarity: bool = True, progress: bool = True) -> dict:
    ck = CheckpointReader(path, "checkpoint")
    cfg = _moe_config(ck)
    target, num_experts, top_k, layers = cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    shapes = {n: info.shape for n, info in ck.tensors.items()
              if not (n == "lm_head.weight" and cfg.tie_word_embeddings)}
    moe = cfg.moe_layers  # Qwen-MoE may keep some layers dense (no experts there)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up and down of a SwiGLU expert
    total, active = parameter_counts(shapes, len(moe) * num_experts * per_expert, num_experts, top_k)
    report: dict = {
        "path": str(ck.path), "architecture": target, "layers": layers, "moe_layers": moe,
        "hidden_size": cfg.hidden_size, "expert_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": num_experts, "top_k": top_k,
        "total_params": total, "active_params": active,
        "dtype": ck.config.get("torch_dtype") or ck.config.get("dtype"),
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "shared_expert": cfg.shared_expert_intermediate_size > 0,
    }
    prov_path = ck.path / "upcycling.json"
    if prov_path.is_file():
        try:
            report["upcycling"] = _provenance(prov_path)
        except _Unreadable as e:
            # The checkpoint is fine without its provenance: report what it is and say why the
            # history is missing rather than refuse to describe it.
            report["upcycling_unreadable"] = str(e)
    if similarity:
        # Reading every expert of a large checkpoint takes a while: show it on a terminal.
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]inspect: comparing experts"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), disable=not (progress and sys.stderr.isatty()),
                      transient=True) as bar:
            task = bar.add_task("layers", total=len(moe))
            report["similarity"] = []
            for i in moe:
                report["similarity"].append(expert_similarity(ck, target, i, num_experts))
                bar.advance(task)
    return report


class _Unreadable(Exception):
    pass


def _is(value, kind) -> bool:
    # JSON true and false parse as Python bools, which are ints: never a count or a ratio here.
    return isinstance(value, kind) and not isinstance(value, bool)


def _provenance(path: Path) -> dict:
    """The summary of an ``upcycling.json``; ``_Unreadable`` says what is wrong with the file."""
    try:
        prov = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise _Unreadable(f"not valid JSON ({e})") from None
    except OSError as e:
        raise _Unreadable(f"cannot be read ({e.strerror})") from None
    if not isinstance(prov, dict):
        raise _Unreadable(f"a JSON {json_type(prov)}, not an object")

    def get(keys: str, kind: type | tuple[type, ...] = str):
        value = prov
        for key in keys.split("."):
            if not isinstance(value, dict) or key not in value:
                raise _Unreadable(f"it has no {keys!r}")
            value = value[key]
        if not _is(value, kind):
            raise _Unreadable(f"its {keys!r} is {json.dumps(value)[:40]}, of the wrong type")
        return value

    number = (int, float)
    method = get("options.method")
    layers = get("layers", list)
    if not all(isinstance(layer, list) and all(isinstance(x, dict) for x in layer) for layer in layers):
        raise _Unreadable("its 'layers' is not a list of layers of expert records")
    intact = [x.get("intact_fraction", float("nan")) for layer in layers for x in layer]
    if not intact or not all(_is(v, number) for v in intact):
        raise _Unreadable("its 'layers' holds no experts or an intact_fraction that is not a number")
    known = METHODS.get(method)
    uses_ratio = known is None or known.uses_ratio
    ratio = get("options.ratio", (*number, list, str))
    try:
        ratio = ratios.parse(ratio, check_ratio)
    except UserError:
        raise _Unreadable(f"its 'options.ratio' is {json.dumps(ratio)[:40]}, of the wrong type") from None
    try:
        per_layer = ratios.recorded(prov)
    except ValueError as e:
        raise _Unreadable(f"its {e}") from None
    if per_layer is not None and len(per_layer) != len(layers):
        raise _Unreadable(f"its 'ratio_per_layer' has {len(per_layer)} values for {len(layers)} layers")
    options = prov["options"]
    return {
        "method": method, "ratio": (list(ratio) if isinstance(ratio, tuple) else ratio) if uses_ratio else None,
        "ratio_per_layer": list(per_layer) if uses_ratio and per_layer is not None else None,
        # recorded only when set (upcycle.recorded_options); drop's alone
        "reinit_scale": options.get("reinit_scale", 1.0), "reinit_down": options.get("reinit_down", "drawn"),
        "index_sampling": get("options.index_sampling"), "reinit_stats": get("options.reinit_stats"),
        "router_init": get("options.router_init"), "seed": get("options.seed", int),
        "dropup_version": get("dropup_version"), "source": get("source.path"),
        "source_type": get("source.config", dict).get("model_type"),
        "intact_fraction_mean": sum(intact) / len(intact),
        "intact_fraction_min": min(intact), "intact_fraction_max": max(intact),
        **_layout(prov["options"]),
        "expansion": _expansion(prov.get("expansion")),
    }


def _expansion(exp) -> dict | None:
    """An expanded MoE's record (upcycle._expansion_record), or None for one built from a dense SRC."""
    if exp is None:
        return None
    if not isinstance(exp, dict) or not all(_is(exp.get(k), int) for k in ("source_experts", "source_top_k", "factor")):
        raise _Unreadable("its 'expansion' lacks source_experts, source_top_k or factor as integers")
    return exp


def _layout(options: dict) -> dict:
    """--granularity and the shared expert's start: recorded only when set (upcycle.recorded_options)."""
    granularity, start = options.get("granularity", 1), options.get("shared_expert", "silent")
    if not _is(granularity, int) or granularity < 1:
        raise _Unreadable(f"its 'options.granularity' is {json.dumps(granularity)[:40]}, not a positive integer")
    if not _is(start, str):
        raise _Unreadable(f"its 'options.shared_expert' is {json.dumps(start)[:40]}, of the wrong type")
    return {"granularity": granularity, "shared_expert_start": start}


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return str(n)


def _dense_layers(r: dict) -> str:
    moe = r["moe_layers"]
    if len(moe) == r["layers"]:
        return ""
    return f", MoE in {len(moe)} of them: {', '.join(map(str, moe))}"


def format_report(r: dict) -> str:
    lines = [
        f"checkpoint   {r['path']}",
        f"architecture {r['architecture']}  ({r['layers']} layers{_dense_layers(r)}, hidden {r['hidden_size']}, "
        f"expert d_f {r['expert_intermediate_size']}, dtype {r['dtype']})",
        f"experts      {r['num_experts']} routed, top-{r['top_k']}"
        + (", plus a shared expert" if r["shared_expert"] else "")
        + f"; aux-loss coefficient {r['router_aux_loss_coef']}",
        f"parameters   {_human(r['total_params'])} total, {_human(r['active_params'])} active per token",
    ]
    if "upcycling_unreadable" in r:
        lines.append(f"provenance   upcycling.json is unreadable ({r['upcycling_unreadable']}); "
                     "how this checkpoint was built is unknown")
    u = r.get("upcycling")
    if u:
        per_layer = " per layer" if u["ratio_per_layer"] else ""
        gentler = (f", re-drawn std x {u['reinit_scale']}" if u["reinit_scale"] != 1.0 else "") + (
            ", re-drawn down columns zero" if u["reinit_down"] == "zeros" else "")
        method = u["method"] + (f" (r = {ratios.text(u['ratio'])}{per_layer}, {u['index_sampling']} indices, "
                                f"{u['reinit_stats']} statistics{gentler})" if u["ratio"] is not None else "")
        lines += [
            f"method       {method}; router {'rows copied from the parents' if u['expansion'] else u['router_init']}; "
            f"seed {u['seed']}",
            f"source       {u['source']} ({u['source_type']}); dropup {u['dropup_version']}",
            f"intact       {u['intact_fraction_mean']:.4f} of each expert's neurons untouched "
            f"(min {u['intact_fraction_min']:.4f}, max {u['intact_fraction_max']:.4f})",
        ]
        if u["expansion"]:
            x = u["expansion"]
            lines.append(f"expanded     from {x['source_experts']} experts top-{x['source_top_k']}: each into {x['factor']} "
                         f"children (expert e from SRC's expert floor(e / {x['factor']}))")
        if u["granularity"] > 1:
            lines.append(f"granularity  {u['granularity']}: each expert one of {u['granularity']} neuron shards of "
                         "a dense FFN copy; the router started with one logit per copy (virtual groups)")
        if r["shared_expert"]:
            lines.append(f"shared       the shared expert started {u['shared_expert_start']}")
    r_of = (u or {}).get("ratio_per_layer")
    if "similarity" in r:
        lines.append("layer" + ("  r     " if r_of else "") + "  mean cos  min cos  identical neurons "
                     "(mean over expert pairs)")
        for s in r["similarity"]:
            lines.append(f"{s['layer']:>5}" + (f"  {r_of[s['layer']]:.4f}" if r_of else "")
                         + f"  {s['mean_cosine']:8.4f} {s['min_cosine']:8.4f}  {s['mean_identical_neurons']:.4f}")
    elif r_of:
        lines.append("r per layer  " + " ".join(f"{x:.4g}" for x in r_of))
    return "\n".join(lines)
