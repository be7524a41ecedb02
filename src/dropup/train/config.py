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
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dropup.errors import UserError
from dropup.hub.gguf import is_gguf
from dropup.model.decoder import ACTIVATION_CHECKPOINTING, MOE_IMPLS
from dropup.model.presets import PRESETS
from dropup.options import Range, literal_args, ranged
from dropup.train.losses import BALANCE_MODES

# The choice lists: a field typed with one of these accepts only its values (checked in _coerce).
# The model and the losses own the first three; the config reads them from there.
MoeImpl = Literal[*MOE_IMPLS]
ActivationCheckpointing = Literal[*ACTIVATION_CHECKPOINTING]
BalanceMode = Literal[*BALANCE_MODES]
Precision = Literal["auto", "bf16", "fp32"]  # auto: bf16 autocast on GPU, fp32 on CPU
Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["float32", "bfloat16"]

# What a changed value means for ``--resume`` (compared with the checkpoint's trainer.json):
#   fixed     the checkpoint's step would stand for other data, tokens or weights, so the run
#             could not continue exactly: refused unless allow_resume_changes is set;
#   schedule  the LR schedule changes from the resumed step on: allowed only when asked for
#             (allow_resume_changes, or --allow-config-change), since the run's curve then bends;
#   free      allowed (intervals, micro-batch, numerics that do not move the data position);
#   ignored   not compared (where the run is and how it is shown).
# Every change that is not ignored is recorded in trainer.json and in the next metrics record.
Resume = Literal["fixed", "schedule", "free", "ignored"]


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge=None, gt=None,
            le=None, lt=None, resume: Resume = "free"):
    """A config field with its range and resume rule, stated once beside its default
    (``validate`` and ``resume_changes`` read them generically). For an optional field the range
    applies when a value is given; for a tuple or list, to each element."""
    return ranged(default, factory=factory, metadata={"resume": resume}, ge=ge, gt=gt, le=le, lt=lt)


@dataclass
class ModelSection:
    init: str | None = setting(None, resume="fixed")  # a Hugging Face checkpoint directory (dense or MoE) or a dense GGUF file
    preset: str | None = setting(None, resume="fixed")  # or a from-scratch shape: one of PRESETS
    vocab_size: int | None = setting(None, ge=1, resume="fixed")  # presets only: override the preset's vocabulary
    init_std: float = setting(0.02, gt=0, resume="fixed")  # from-scratch: every matrix N(0, init_std^2)
    moe_impl: MoeImpl = "auto"  # an implementation choice: the same function


@dataclass
class DatasetSection:
    path: str = setting("", resume="fixed")
    weight: float = setting(1.0, gt=0, resume="fixed")
    name: str | None = None  # in logs (val_loss per dataset); default: the directory's name


@dataclass
class DataSection:
    datasets: list[DatasetSection] = setting(factory=list, resume="fixed")
    seq_len: int | None = setting(None, ge=1, resume="fixed")  # default: the model's max_position_embeddings
    eval_batches: int = setting(4, ge=0)  # micro-batches per dataset in each validation pass


@dataclass
class BatchSection:
    global_batch: int = setting(512, ge=1, resume="fixed")  # sequences per optimizer step, over all ranks
    # The data order is a function of the global sample index, so the split into micro-batches
    # may change on resume.
    micro_batch: int = setting(8, ge=1)  # sequences per forward pass on one rank


@dataclass
class OptimSection:
    lr: float | None = setting(None, gt=0, resume="schedule")  # None: the paper's 2e-4 (MoE), 3e-4 (dense)
    min_lr: float | None = setting(None, ge=0, resume="schedule")  # None: lr / 10
    warmup_steps: int = setting(2000, ge=0, resume="schedule")
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)
    eps: float = setting(1e-8, gt=0)
    weight_decay: float = setting(0.1, ge=0)
    grad_clip: float = setting(1.0, gt=0)  # a negative max norm would reverse every update
    # Fixed on resume: the checkpoint's moments are stored in it, and bfloat16 ones do not load
    # into a float32 AdamW.
    state_dtype: Dtype = setting("float32", resume="fixed")  # AdamW moments: bfloat16 saves 4 bytes/parameter


@dataclass
class LossSection:
    aux_loss_coef: float | None = setting(None, ge=0)  # None: the checkpoint's router_aux_loss_coef (paper: 0.02)
    balance_mode: BalanceMode = "pooled"  # pooled is the paper's
    z_loss_coef: float = setting(0.0, ge=0)  # router z-loss (ST-MoE); 0 = off
    # Aux-loss-free balancing (DeepSeek-V3): after each step every expert's selection bias moves
    # by this rate towards balance (DeepSeek-V3 used 0.001); 0 = off. It works beside the
    # balance loss; aux_loss_coef: 0 leaves it alone.
    bias_update_rate: float = setting(0.0, ge=0)


@dataclass
class LogSection:
    # metrics.jsonl's scalars also as TensorBoard events in out_dir/tensorboard (rank 0); needs
    # the tensorboard package (pip install 'dropup[tensorboard]')
    tensorboard: bool = setting(False, resume="ignored")


@dataclass
class AnalysisSection:
    # At every saved checkpoint of an MoE run (rank 0): `dropup analyze routing` of its export on
    # the datasets' val splits, into out_dir/analysis/step_N/routing, and one summary line per
    # checkpoint (JSD, dead experts) in out_dir/analysis/routing.jsonl: curves over training.
    routing: bool = setting(False, resume="ignored")
    tokens: int = setting(20_000, ge=2, resume="ignored")  # per dataset (at most its val split)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    log: LogSection = field(default_factory=LogSection)
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    steps: int | None = setting(None, ge=1, resume="schedule")  # optimizer steps; or
    tokens: int | None = setting(None, ge=1, resume="schedule")  # a token budget (rounded down to whole steps)
    out_dir: str = setting("runs/train", resume="ignored")
    seed: int = setting(0, ge=0, lt=2**64, resume="fixed")  # numpy and torch take seeds in [0, 2^64)
    precision: Precision = "auto"
    device: Device = "auto"
    compile: bool | None = None  # per-layer torch.compile; None: on CUDA only
    # Activations recomputed in the backward instead of kept, on decoder layers 0, N, 2N, ...
    # for N = activation_checkpointing_every (see CausalLM.set_activation_checkpointing). Free
    # on resume: the gradients are the same.
    activation_checkpointing: ActivationCheckpointing = "none"
    activation_checkpointing_every: int = setting(1, ge=1)
    log_interval: int = setting(10, ge=1)
    eval_interval: int = setting(500, ge=0)  # 0 = only at the end
    save_interval: int = setting(1000, ge=0)  # 0 = only at the end
    keep_last: int = setting(2, ge=1)  # checkpoints kept in out_dir/ckpt
    export_dtype: Dtype = "float32"  # dtype of the Hugging Face export in each checkpoint
    max_bad_steps: int = setting(5, ge=1)  # stop after this many non-finite steps in a row
    inject_nan_steps: list[int] = field(default_factory=list)  # fault injection for tests
    progress: bool = setting(True, resume="ignored")  # rich progress bar (on a terminal, rank 0)
    # --resume with a changed "fixed" setting (seed, global batch, seq_len, datasets, model):
    # continue anyway, from the checkpoint's sample position, and record the change.
    allow_resume_changes: bool = setting(False, resume="ignored")

    def validate(self) -> None:
        _check_fields(self)
        m = self.model
        if (m.init is None) == (m.preset is None):
            raise UserError("config: set exactly one of model.init (a checkpoint) or model.preset "
                            f"(one of {', '.join(PRESETS)})")
        if m.preset is not None and m.preset not in PRESETS:
            raise UserError(f"config: unknown model.preset {m.preset!r}; choose one of {', '.join(PRESETS)}")
        if m.init is not None and not (Path(m.init) / "config.json").exists() and not is_gguf(m.init):
            raise UserError(f"config: model.init {m.init} is not a Hugging Face checkpoint (no config.json) "
                            "or a GGUF file")
        if not self.data.datasets:
            raise UserError("config: data.datasets is empty; list at least one prepared dataset directory")
        for d in self.data.datasets:
            if not d.path:
                raise UserError("config: every entry of data.datasets needs a path")
        names = [d.name for d in self.data.datasets]
        if len(set(names)) != len(names):
            raise UserError(f"config: dataset names must be distinct, got {names}")
        if (self.steps is None) == (self.tokens is None):
            raise UserError("config: set exactly one of steps or tokens")
        if self.log.tensorboard:
            import importlib.util

            # Checked here, on every rank, so that no rank starts training while rank 0 stops.
            if importlib.util.find_spec("tensorboard") is None:
                raise UserError("config: log.tensorboard is true but the tensorboard package is not installed; "
                                "pip install 'dropup[tensorboard]' (or tensorboard), or set log.tensorboard: false")
        b = self.batch
        if b.global_batch % b.micro_batch:
            raise UserError(f"config: batch.global_batch ({b.global_batch}) must be a positive multiple of "
                            f"batch.micro_batch ({b.micro_batch})")

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


def _check_fields(obj, where: str = "") -> None:
    """Every field of a config, read by ``_build`` or built in code: choices, ranges, finiteness."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), where + f.name
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
        elif typing.get_origin(hints[f.name]) is Literal:
            _check_choice(hints[f.name], value, key)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    _check_fields(v, f"{key}[{i}].")
                else:
                    _check_number(f, v, key)
        else:
            _check_number(f, value, key)


def _check_number(f: dataclasses.Field, value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # types are _coerce's; every float must be finite, bounded or not
    f.metadata.get("range", Range()).check(f"config: {key}", value)


def resume_kind(key: str) -> Resume:
    """The resume rule of a flattened key such as ``data.datasets[1].weight``."""
    cls, kind = TrainConfig, "free"
    for part in key.split("."):
        name = part.split("[")[0]
        f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        if f is None:
            return kind
        kind = f.metadata.get("resume", "free")
        tp = typing.get_type_hints(cls)[name]
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        cls = tp if dataclasses.is_dataclass(tp) else None
        if cls is None:
            break
    return kind


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        return {k: v for key, sub in x.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(x, list) and any(isinstance(v, dict) for v in x):
        out = {f"{prefix[:-1]}": len(x)}  # the number of entries: a dataset added or removed
        for i, sub in enumerate(x):
            out.update(_flatten(sub, f"{prefix[:-1]}[{i}]."))
        return out
    return {prefix[:-1]: x}


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    kind: Resume

    def __str__(self) -> str:
        def short(v):
            text = json.dumps(v)
            return text if len(text) <= 40 else text[:37] + "..."

        return f"{self.key} {short(self.old)} -> {short(self.new)}"


def resume_changes(saved: dict, cfg: TrainConfig, what: str) -> list[Change]:
    """The settings of ``cfg`` that differ from a checkpoint's config (``saved``, as in its
    trainer.json). ``UserError`` if a "fixed" one changed and ``allow_resume_changes`` is off.
    Keys a checkpoint predates (absent from ``saved``) are not compared."""
    old = _flatten(saved)
    new = _flatten(json.loads(json.dumps(cfg.to_dict())))  # tuples as JSON lists, as saved
    changes = [Change(k, old.get(k), new.get(k), resume_kind(k)) for k in sorted(old.keys() | new.keys())
               if (k in old or _parent_list(k) in old) and old.get(k) != new.get(k)]
    changes = [c for c in changes if c.kind != "ignored"]
    fixed = [c for c in changes if c.kind == "fixed"]
    schedule = [c for c in changes if c.kind == "schedule"]
    if fixed and not cfg.allow_resume_changes:
        raise UserError(f"--resume: {what} was trained with other settings: {'; '.join(map(str, fixed))}. "
                        "These change the data order, the token count or the model, so the run would not "
                        "continue as it began: restore them, or pass --allow-config-change (YAML: "
                        "allow_resume_changes: true) to go on from the checkpoint anyway (the change is recorded)")
    if schedule and not cfg.allow_resume_changes:
        raise UserError(f"--resume: {'; '.join(map(str, schedule))} changes the learning-rate schedule "
                        f"(warm-up, then cosine to min_lr at the last step) from {what} on: pass "
                        "--allow-config-change (YAML: allow_resume_changes: true) to accept it (the change "
                        "is recorded in metrics.jsonl), or restore the old value")
    return changes


def _parent_list(key: str) -> str:
    # data.datasets[2].path of a dataset added on resume: compared because data.datasets was saved.
    return key.split("[")[0]


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
