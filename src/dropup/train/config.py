"""The training run's typed config: YAML file + dotted ``--set`` overrides -> ``TrainConfig``.

Example (every key except ``model`` and ``data`` has a default; see the README)::

    model: {preset: moe-tiny}            # or {init: path/to/hf_checkpoint}
    data:
      datasets:
        - {path: data/prose, weight: 2}
        - {path: data/code, weight: 1}
    batch: {global_batch: 16, micro_batch: 4}
    steps: 200                            # or tokens: 1_000_000
    optim: {lr: 2.0e-4, warmup_steps: 20}
    out_dir: runs/tiny
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dropup.choices import literal_args
from dropup.errors import UserError
from dropup.model.decoder import MOE_IMPLS
from dropup.model.presets import PRESETS
from dropup.train.losses import BALANCE_MODES

# The choice lists: a field typed with one of these accepts only its values (checked in _coerce).
# The model and the losses own the first two; the config reads them from there.
MoeImpl = Literal[*MOE_IMPLS]
BalanceMode = Literal[*BALANCE_MODES]
Precision = Literal["auto", "bf16", "fp32"]  # auto: bf16 autocast on GPU, fp32 on CPU
Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["float32", "bfloat16"]


@dataclass
class ModelSection:
    init: str | None = None  # a Hugging Face checkpoint directory (dense or MoE) to start from
    preset: str | None = None  # or a from-scratch shape: one of PRESETS
    vocab_size: int | None = None  # presets only: override the preset's vocabulary
    init_std: float = 0.02  # from-scratch: every matrix N(0, init_std^2), as the paper
    moe_impl: MoeImpl = "auto"


@dataclass
class DatasetSection:
    path: str = ""
    weight: float = 1.0
    name: str | None = None  # in logs (val_loss per dataset); default: the directory's name


@dataclass
class DataSection:
    datasets: list[DatasetSection] = field(default_factory=list)
    seq_len: int | None = None  # default: the model's max_position_embeddings
    eval_batches: int = 4  # micro-batches per dataset in each validation pass


@dataclass
class BatchSection:
    global_batch: int = 512  # sequences per optimizer step, over all ranks
    micro_batch: int = 8  # sequences per forward pass on one rank


@dataclass
class OptimSection:
    lr: float | None = None  # None: the paper's 2e-4 for MoE models, 3e-4 for dense ones
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    state_dtype: Dtype = "float32"  # AdamW moments: bfloat16 saves 4 bytes/parameter


@dataclass
class LossSection:
    aux_loss_coef: float | None = None  # None: the checkpoint's router_aux_loss_coef (paper: 0.02)
    balance_mode: BalanceMode = "pooled"  # pooled is the paper's
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE); 0 = off


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    steps: int | None = None  # optimizer steps; or
    tokens: int | None = None  # a token budget (rounded down to whole steps)
    out_dir: str = "runs/train"
    seed: int = 0
    precision: Precision = "auto"
    device: Device = "auto"
    compile: bool | None = None  # per-layer torch.compile; None: on CUDA only
    log_interval: int = 10
    eval_interval: int = 500  # 0 = only at the end
    save_interval: int = 1000  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept in out_dir/ckpt
    export_dtype: Dtype = "float32"  # dtype of the Hugging Face export in each checkpoint
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    inject_nan_steps: list[int] = field(default_factory=list)  # fault injection for tests
    progress: bool = True  # rich progress bar (on a terminal, rank 0)

    def validate(self) -> None:
        _check_choices(self)
        m = self.model
        if (m.init is None) == (m.preset is None):
            raise UserError("config: set exactly one of model.init (a checkpoint) or model.preset "
                            f"(one of {', '.join(PRESETS)})")
        if m.preset is not None and m.preset not in PRESETS:
            raise UserError(f"config: unknown model.preset {m.preset!r}; choose one of {', '.join(PRESETS)}")
        if m.init is not None and not (Path(m.init) / "config.json").exists():
            raise UserError(f"config: model.init {m.init} is not a Hugging Face checkpoint (no config.json)")
        if not self.data.datasets:
            raise UserError("config: data.datasets is empty; list at least one prepared dataset directory")
        for d in self.data.datasets:
            if not d.path:
                raise UserError("config: every entry of data.datasets needs a path")
            if not d.weight > 0:
                raise UserError(f"config: dataset {d.path} has weight {d.weight}; weights must be > 0")
        names = [d.name for d in self.data.datasets]
        if len(set(names)) != len(names):
            raise UserError(f"config: dataset names must be distinct, got {names}")
        if (self.steps is None) == (self.tokens is None):
            raise UserError("config: set exactly one of steps or tokens")
        b = self.batch
        if b.micro_batch < 1 or b.global_batch < 1 or b.global_batch % b.micro_batch:
            raise UserError(f"config: batch.global_batch ({b.global_batch}) must be a positive multiple of "
                            f"batch.micro_batch ({b.micro_batch})")
        for key in ("log_interval", "keep_last", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"config: {key} must be >= 1")
        for key in ("eval_interval", "save_interval", "optim.warmup_steps"):
            if _get(self, key) < 0:
                raise UserError(f"config: {key} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML, apply ``key.sub=value`` overrides (values parsed as YAML), type-check, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file {p} not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {p} must hold a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = parsed
    cfg = _build(TrainConfig, raw, "")
    for d in cfg.data.datasets:
        d.name = d.name or Path(d.path).name
    cfg.validate()
    return cfg


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _build(cls, raw: Any, where: str):
    """Instantiate dataclass ``cls`` from plain YAML data, checking every key and type."""
    if not isinstance(raw, dict):
        raise UserError(f"config: {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"config: unknown key {where}{unknown[0]}; known keys here: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _check_choice(tp, value: Any, where: str):
    allowed = literal_args(tp)
    # By type too: YAML's 1 or true must not pass for a choice "1" or "true".
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise UserError(f"config: {where} must be one of {', '.join(map(str, allowed))}, not {value!r}")
    return value


def _check_choices(obj, where: str = "") -> None:
    """The Literal fields of a config built in code rather than read by ``_build``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{where}{f.name}.")
        elif typing.get_origin(hints[f.name]) is Literal:
            _check_choice(hints[f.name], value, where + f.name)


def _coerce(tp, value: Any, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return _check_choice(tp, value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config: {where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"config: {where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if tp is float:
        # YAML reads 2e-4 (no dot) as a string; accept it and ints as floats.
        if isinstance(value, bool):
            raise UserError(f"config: {where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config: {where} must be a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # 1_000_000 and 1e6 as written in YAML by hand
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"config: {where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config: {where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"config: {where} must be a string, got {value!r}")
        return str(value)
    return value
