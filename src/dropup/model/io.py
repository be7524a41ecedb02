"""Hugging Face checkpoint I/O for dropup's model: same ``config.json``, same tensor names.

A checkpoint goes from transformers to dropup and back without conversion scripts. The model
stacks each layer's experts into ``[E, out, in]`` parameters; only this module knows the Hub's
per-expert names (``hf_names``).

    model = load_model("path/to/hf_checkpoint", device="cuda", dtype=torch.float32)
    save_model(model, "out/")                                     # == model.save_pretrained("out/")

For training, ``meta_model`` builds the model without storage, to be compiled and sharded first;
``load_into`` then reads into each process only the rows of each tensor that it holds.

A model trained with aux-loss-free balancing also has per-layer selection biases, which no
Mixtral / Qwen-MoE config.json can express: ``save_model`` writes them to ``ROUTER_BIAS_FILE``
beside the weights and ``load_model`` applies them; transformers and other loaders ignore the
file and route without them.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import torch

from dropup.errors import UserError
from dropup.hub import names as archs
from dropup.hub.atomic import atomic_dir
from dropup.hub.config import ModelConfig, config_json
from dropup.hub.safetensors import (
    ROUTER_BIAS_FILE,
    CheckpointReader,
    ShardedWriter,
    TensorSpec,
    read_json_object,
    read_router_bias_file,
    write_router_bias_file,
)
from dropup.model.decoder import CausalLM, moe_layers, selection_biases

_EXPERT_PARAM = re.compile(r"model\.layers\.(\d+)\.mlp\.(router\.weight|experts\.(gate|up|down)_proj)")


class Stacked(NamedTuple):
    """One matrix of every expert inside a Hub tensor that stacks ``matrices`` along dim 1."""

    name: str
    matrices: tuple[str, ...]
    matrix: str


def hf_names(name: str, cfg: ModelConfig) -> str | list[str] | Stacked:
    """The checkpoint name(s) of one of the model's parameters: a list for experts stored one per
    tensor, a ``Stacked`` where the Hub layout stacks them (GraniteMoE). The Hub names themselves
    are defined once, in ``dropup.hub.names`` (the converter writes them)."""
    m = _EXPERT_PARAM.fullmatch(name)
    if not m:
        return name
    layer = int(m.group(1))
    if m.group(2) == "router.weight":
        return archs.router_name(cfg.model_type, layer)
    stacked = archs.stacked_in(cfg.model_type, layer, m.group(3))
    if stacked is not None:
        return Stacked(*stacked, m.group(3))
    return [archs.expert_name(cfg.model_type, layer, e, m.group(3)) for e in range(cfg.num_experts)]


def _hub_keys(hf: str | list[str] | Stacked) -> list[str]:
    return [hf] if isinstance(hf, str) else [hf.name] if isinstance(hf, Stacked) else hf


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's (full, unsharded) state dict under Hub names, experts unstacked (or stacked
    the Hub's way)."""
    out, stacks = {}, {}
    for name, t in state_dict.items():
        hf = hf_names(name, cfg)
        if isinstance(hf, Stacked):
            stacks.setdefault(hf.name, [None] * len(hf.matrices))[hf.matrices.index(hf.matrix)] = t
        elif isinstance(hf, list):
            out.update(zip(hf, t.unbind(0)))
        else:
            out[hf] = t
    out.update({name: torch.cat(parts, dim=1) for name, parts in stacks.items()})
    return out


def _wanted(available, cfg: ModelConfig, names: list[str]) -> dict[str, str | list[str] | Stacked]:
    """Each of parameter ``names``' Hub name(s); a checkpoint that lacks one of them, or holds a
    tensor none of them reads, does not match its config.json (one line)."""
    available = set(available)
    wanted = {n: hf_names(n, cfg) for n in names}
    needed = {h for hf in wanted.values() for h in _hub_keys(hf)}
    missing = sorted(needed - available)
    unexpected = sorted(
        k for k in available - needed
        if not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    )  # fmt: skip
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match its config.json ({cfg.model_type}): "
            f"{len(missing)} missing tensors {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}"
        )
    return wanted


def from_hf_state_dict(tensors, cfg: ModelConfig, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's state dict for parameter ``names`` from a mapping of Hub-named tensors.

    ``tensors`` needs only ``__getitem__`` and ``keys()`` so a lazy safetensors reader works.
    """
    def rows(name: str, start: int | None, stop: int | None) -> torch.Tensor:
        return tensors[name][start:stop]

    return {n: _read_param(rows, hf) for n, hf in _wanted(tensors.keys(), cfg, names).items()}


def _read_param(rows, hf: str | list[str] | Stacked, start: int | None = None, stop: int | None = None):
    """Rows ``start:stop`` (dim 0; None: all) of one model parameter from its Hub tensor(s) ``hf``;
    ``rows(name, start, stop)`` reads rows of one Hub tensor. Stacked experts: dim 0 is the expert."""
    if isinstance(hf, Stacked):
        return archs.expert_matrix(rows(hf.name, start, stop), hf.matrices, hf.matrix).contiguous()
    if isinstance(hf, list):
        return torch.stack([rows(h, None, None) for h in hf[start:stop]])
    return rows(hf, start, stop)


class _DeviceReader:
    """Name-addressed, lazy view of a checkpoint that hands tensors out on ``device``; reading and
    validation (sharded or single safetensors, truncated files named) are ``CheckpointReader``'s."""

    def __init__(self, path: Path, device: torch.device):
        self.ck, self.device = CheckpointReader(path, "checkpoint"), device

    def keys(self):
        return self.ck.tensors.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.ck.get(name).to(self.device)


def load_config(path: str | os.PathLike) -> ModelConfig:
    p = Path(path) / "config.json"
    if not p.exists():
        raise UserError(f"{p} not found: expected a Hugging Face checkpoint directory")
    return ModelConfig.from_hf(read_json_object(p, "a Hugging Face model config"), where=str(p))


def runtime(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device and weight dtype for ``dropup.options.Device`` / ``Precision`` choices."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA GPU is available; use --device cpu")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu")
    name = dtype if dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    return dev, getattr(torch, name)


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    moe_impl: str = "auto",
) -> CausalLM:
    """A ``CausalLM`` with the weights of the Hugging Face checkpoint at ``path``.

    ``dtype`` None keeps the checkpoint's dtype (train with ``torch.float32`` master weights).
    The model is built on the meta device and the tensors are assigned to it, so no memory or time
    goes into a random initialisation that would be overwritten.
    """
    path = Path(path)
    cfg = load_config(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = CausalLM(cfg)
    reader = _DeviceReader(path, device)
    names = list(model.state_dict().keys())
    state = from_hf_state_dict(reader, cfg, names)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _init_buffers(model, path, device)
    model.set_moe_impl(moe_impl)
    return model


def _init_buffers(model: CausalLM, path: Path, device: torch.device) -> None:
    """The buffers no checkpoint tensor holds, as every loader sets them: RoPE's inverse
    frequencies recomputed in fp32, the selection biases from ``ROUTER_BIAS_FILE`` (or zero)."""
    model.model.rotary_emb.to_empty(device=device)
    model.model.rotary_emb.reset()
    for moe in moe_layers(model):  # a buffer outside the state dict: fp32 whatever the weights are
        moe.selection_bias = torch.zeros(moe.num_experts, device=device)
    load_router_bias(model, path)


def meta_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, moe_impl: str = "auto") -> CausalLM:
    """The model of the checkpoint at ``path`` with no storage (on the meta device), its weights in
    ``dtype``: compile or shard it (FSDP2's ``fully_shard`` takes meta parameters), then
    ``load_into`` materialises it and reads its weights."""
    cfg = load_config(path)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.to(dtype)
    model.set_moe_impl(moe_impl)
    return model


@torch.no_grad()
def load_into(model: torch.nn.Module, path: str | os.PathLike, device: str | torch.device) -> torch.nn.Module:
    """Materialise ``meta_model``'s model, plain or sharded with FSDP2, on ``device`` and fill it
    from the checkpoint at ``path``, one parameter at a time and of each only the rows this process
    holds (``_local_rows``), read as a slice of the file: no process holds more of the model in host
    memory than one parameter's share. The parameters are bit for bit ``load_model``'s in the same
    dtype; the buffers are set as it sets them."""
    path, device = Path(path), torch.device(device)
    model.to_empty(device=device)
    reader = CheckpointReader(path, "checkpoint")
    params = dict(model.named_parameters())
    wanted = _wanted(reader.tensors.keys(), model.config, list(params))
    fused = {hf.name for hf in wanted.values() if isinstance(hf, Stacked)}
    last: dict[str, torch.Tensor] = {}

    def rows(name: str, start: int | None, stop: int | None) -> torch.Tensor:
        if name not in fused:
            return reader.get_rows(name, start, stop)
        # GraniteMoE stacks gate and up in one file tensor: its rows are read once for both.
        if name not in last:
            last.clear()
            last[name] = reader.get_rows(name, start, stop)
        return last[name]

    for name, hf in wanted.items():
        local, start, stop = _local_rows(params[name])
        if stop > start:  # a rank past the end of a short dim 0 (FSDP2 pads it) holds nothing
            local.copy_(_read_param(rows, hf, start, stop))
    _init_buffers(model, path, device)
    return model


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """What this process stores of ``param`` and which rows ``start:stop`` of the full parameter
    that is: all of them, or for a DTensor sharded on dim 0 over a 1-D mesh (FSDP2) its rank's
    chunk, split as ``torch.chunk`` splits (chunks of ceil(rows / world), the last ones short)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param, 0, param.shape[0]
    local = param.to_local()
    if not all(isinstance(p, Shard) and p.dim == 0 for p in param.placements) or param.device_mesh.ndim != 1:
        raise NotImplementedError(f"load_into reads dim-0 shards over a 1-D mesh (FSDP2), not {param.placements}")
    rows, world = param.shape[0], param.device_mesh.size()
    start = min(param.device_mesh.get_local_rank() * -(-rows // world), rows)
    return local, start, start + local.shape[0]


def _router_bias_names(model: CausalLM) -> list[str]:
    """The router-bias file's tensor names, one per MoE layer in layer order (``selection_biases``)."""
    cfg = model.config
    return [archs.router_bias_name(cfg.model_type, i) for i, layer in enumerate(model.model.layers) if layer.is_moe]


def write_router_bias(model: CausalLM, out: str | os.PathLike) -> Path | None:
    """``out / ROUTER_BIAS_FILE`` with the model's selection biases (float32, one [E] tensor per
    MoE layer), or nothing (None) when every bias is zero: the plain routing needs no file."""
    biases = selection_biases(model)
    if not any(bool(b.any()) for b in biases):
        return None
    return write_router_bias_file(out, dict(zip(_router_bias_names(model), biases)))


def load_router_bias(model: CausalLM, path: str | os.PathLike) -> bool:
    """Set every MoE layer's selection bias from the checkpoint directory ``path``'s
    ``ROUTER_BIAS_FILE``, or to zero when it has none; True when the file was read."""
    biases = selection_biases(model)
    tensors = read_router_bias_file(path, _router_bias_names(model), model.config.num_experts) if biases else None
    with torch.no_grad():
        for name, b in zip(_router_bias_names(model), biases):
            if tensors is None:
                b.zero_()
            else:
                b.copy_(tensors[name])
    return tensors is not None


def save_model(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write ``config.json`` and safetensors under Hub names into ``path``.

    ``state_dict`` overrides the model's own (e.g. a full state dict gathered from FSDP shards).
    Files are written into a temporary directory beside ``path`` and moved into place, so a
    crash never leaves a half-written checkpoint under a final name. Over an existing directory
    (it may hold a tokenizer) they replace the previous weights and config.json file by file.
    Selection biases, when the model has any, go to ``ROUTER_BIAS_FILE`` in float32 whatever
    ``dtype`` says (a rounded bias would route differently).
    """
    cfg = model.config
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = to_hf_state_dict(sd, cfg)
    saved_dtype = dtype or next(iter(tensors.values())).dtype
    hf_config = cfg.to_hf(dtype=str(saved_dtype).removeprefix("torch."),
                          transformers_version=version("transformers"))
    # In name order, sharded greedily: one file when it fits.
    plan = [TensorSpec(dtype or tensors[k].dtype, tuple(tensors[k].shape), name=k) for k in sorted(tensors)]
    # A previous save's router-bias directory goes too: without its own the model routes unbiased.
    stale = ("model*.safetensors*", ROUTER_BIAS_FILE.split("/")[0])
    with atomic_dir(path, existing="merge", stale=stale, label="checkpoint") as tmp:
        # Buffered: these tensors live wherever the model put them, rarely placed for direct I/O.
        with ShardedWriter(tmp, plan, max_shard_bytes, direct=False) as writer:
            for spec in plan:
                t = tensors[spec.name]
                writer.write(spec.name, (t.to(dtype) if dtype is not None else t).detach().to("cpu"))
        write_router_bias(model, tmp)
        (tmp / "config.json").write_text(config_json(hf_config))
