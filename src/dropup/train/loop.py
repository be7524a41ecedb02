"""``dropup train``: the paper's training recipe for dense and MoE models, on one or more devices.

Recipe (the Drop-Upcycling paper's defaults): AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1 on
matrices only (not norms or biases), gradient clipping 1.0, linear warm-up then cosine decay to
a minimum LR, bf16 autocast with fp32 master weights on GPU, gradient accumulation to a global
batch, next-token loss plus the load-balancing loss (coefficient 0.02) for MoE models.

Several processes (``torchrun --nproc-per-node N -m dropup train ...``) shard the model with
FSDP2; micro-batch j of a step goes to rank j % N, so any number of processes computes the same
global batch. A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` and
``ckpt/step_N/`` (see ``dropup.train.checkpoints``); with ``log.tensorboard`` also ``tensorboard/``,
the same scalars as metrics.jsonl for TensorBoard.

Reading order: ``setup`` builds a ``Run`` (data, model, ``RunPlan``, optimizer, resumed state);
``train_step`` is one optimizer step; ``evaluate`` the validation pass; ``_train`` the outer
loop (LR schedule, logging, the non-finite streak, checkpoints), run under an exclusive lock on
the run directory so that a second trainer cannot append to the same metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from dropup.analysis.routing import RouterStats, expert_counts
from dropup.data.tokens import Mixture, Source, TokenFile, read_meta, validation_batches
from dropup.errors import UserError
from dropup.hub.atomic import atomic_write_text, exclusive_lock
from dropup.hub.card import check_tokenizers
from dropup.hub.config import ModelConfig
from dropup.hub.gguf import dense_source
from dropup.model.decoder import CausalLM, DecoderLayer, build_model, selection_biases
from dropup.model.io import ROUTER_BIAS_FILE, load_into, load_router_bias, meta_model
from dropup.model.lm_loss import bits_per_byte, target_bytes, window_nll
from dropup.train.checkpoints import checkpoints, find_resumable, load_checkpoint, save_checkpoint
from dropup.train.config import PRESETS, Change, TrainConfig, resume_changes
from dropup.train.losses import GlobalBatchCounts, bias_step, load_balancing_loss, router_z_loss
from dropup.train.optim import (  # noqa: F401  (param_groups: re-export)
    apply_settings,
    build_optimizer,
    lr_at,
    param_groups,
)
from dropup.train.plan import RunPlan, plan_run

# ---- setup -------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def setup_distributed(device_pref: str) -> Dist:
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("config: device is cuda but no CUDA GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def on_rank0(d: Dist, fn: Callable):
    """``fn()`` on rank 0 only; every rank gets its result, or raises the ``UserError`` it raised,
    so that all processes stop together instead of the others waiting in a collective."""
    result, error = None, None
    if d.rank == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if d.world > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise UserError(error)
    return result


def note(d: Dist, text: str) -> None:
    if d.rank == 0:
        print(f"dropup train: {text}", file=sys.stderr, flush=True)


def phase(d: Dist, text: str, t0: float) -> None:
    """A start-up phase on stdout (loading, compiling and sharding can take minutes on a big model,
    and a silent terminal looks hung)."""
    if d.rank == 0:
        print(f"dropup train: {text} ({time.perf_counter() - t0:.1f} s)", flush=True)


def lock_run_dir(run_dir: Path):
    """An exclusive lock on ``.NAME.dropup-lock`` beside the run directory, held while training."""
    run_dir = run_dir.resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"out_dir {run_dir} exists and is not a directory; choose another out_dir")
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {run_dir.parent} for out_dir ({e.strerror}); choose another out_dir") from None
    return exclusive_lock(run_dir.parent / f".{run_dir.name}.dropup-lock", f"run directory {run_dir}")


def open_data(cfg: TrainConfig) -> tuple[list[Source], dict]:
    sources = [Source(d.name, TokenFile(d.path, "train"), d.weight) for d in cfg.data.datasets]
    metas = [s.file.meta for s in sources]
    vocab = max(m["vocab_size"] for m in metas)
    return sources, {"vocab_size": vocab}


def open_validation(cfg: TrainConfig, seq_len: int, micro_batch: int) -> dict[str, list[torch.Tensor]]:
    """The fixed validation batches of each dataset that has a 'val' split (by dataset name)."""
    val_sets = {}
    for spec in cfg.data.datasets:
        if "val" in TokenFile(spec.path, "train").meta["splits"]:
            batches = validation_batches(TokenFile(spec.path, "val"), seq_len, micro_batch, cfg.data.eval_batches)
            if batches:
                val_sets[spec.name] = batches
    return val_sets


def validation_token_bytes(cfg: TrainConfig, names) -> dict[str, torch.Tensor]:
    """Each validation dataset's per-token-id byte table (``TokenFile.token_bytes``), for bits per
    byte; a dataset without one (no tokenizer recorded) is left out."""
    tables = {}
    for spec in cfg.data.datasets:
        if spec.name in names:
            table = TokenFile(spec.path, "val").token_bytes()
            if table is not None:
                tables[spec.name] = torch.from_numpy(table)
    return tables


def make_model(cfg: TrainConfig, data_vocab: int, init: str | None = None) -> CausalLM:
    """The model to train: for ``init`` (``model.init``, or its dequantised copy when that is a GGUF
    file) its shape on the meta device, which ``place_model`` fills once it is compiled and sharded;
    else the preset drawn from the seed, on the CPU."""
    torch.manual_seed(cfg.seed)  # the from-scratch initialisation is a function of the seed
    m = cfg.model
    init = init or m.init
    if init is not None:
        model = meta_model(init, dtype=torch.float32, moe_impl=m.moe_impl)
    else:
        hf = dict(PRESETS[m.preset])
        hf["vocab_size"] = m.vocab_size or hf["vocab_size"] or data_vocab
        if cfg.data.seq_len:
            hf["max_position_embeddings"] = max(hf["max_position_embeddings"], cfg.data.seq_len)
        model = build_model(ModelConfig.from_hf(hf), device="cpu", dtype=torch.float32, std=m.init_std)
        model.set_moe_impl(m.moe_impl)
    if data_vocab > model.config.vocab_size:
        raise UserError(f"the data's vocabulary ({data_vocab}) is larger than the model's "
                        f"({model.config.vocab_size}); the token ids would index past the embedding")
    return model


def place_model(model: CausalLM, d: Dist, bf16: bool, init: str | None) -> torch.nn.Module:
    """The model on the run's device(s): sharded with FSDP2 over several processes, and with an
    ``init`` checkpoint materialised there and read shard by shard (each process reads only the
    rows it holds, straight into device memory), so no process holds the whole model on its host."""
    if d.world > 1:
        model = shard(model, d, bf16)  # a from-scratch model's shards move to the mesh's device
    if init is not None:
        load_into(model, init, d.device)
    elif d.world == 1:
        model.to(d.device)
    return model


def shard(model: CausalLM, d: Dist, bf16: bool) -> torch.nn.Module:
    """FSDP2: each decoder layer is one all-gather unit; the root holds embeddings and head."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


# ---- logging -----------------------------------------------------------------------------------


class _Log:
    """metrics.jsonl (rank 0) plus a progress bar on a terminal or a plain line per log step, and
    with ``tensorboard`` the same scalars as TensorBoard events in ``tensorboard_dir``."""

    def __init__(self, path: Path, total: int, start: int, enabled: bool, bar: bool,
                 tensorboard_dir: Path | None = None):
        self.path, self.enabled = path, enabled
        self.progress = None
        self.tb = None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops the events after its checkpoint's step, as metrics.jsonl its records.
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=start + 1 if start else None)
        if enabled and bar and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")
        if self.tb is not None:
            for tag, value in _scalars(record):
                self.tb.add_scalar(tag, value, record["step"])
            self.tb.flush()
        info = f"loss {record['loss']:.4f}" if record.get("loss") is not None else "loss nan"
        if record.get("tokens_per_s"):
            info += f"  {record['tokens_per_s']:,.0f} tok/s"
        if "val_loss" in record:
            info += "  val " + " ".join(f"{k} {v:.4f}" for k, v in record["val_loss"].items())
        if record.get("skipped"):
            info += "  (skipped: non-finite)"
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], info=info)
        else:
            print(f"step {record['step']}: {info}", flush=True)

    def tick(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()


def _scalars(record: dict, prefix: str = ""):
    """(tag, number) for every finite number in a metrics record, nested keys and list indices
    joined by "/" (val_loss/prose, router_entropy/0); the step is the x-axis, not a scalar, and a
    resume's config_changes and the MoE layers' indices are settings, not measurements."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if key in ("step", "config_changes", "router_layers") and not prefix:
            continue
        if isinstance(value, dict):
            yield from _scalars(value, tag + "/")
        elif isinstance(value, list):
            yield from _scalars({str(i): v for i, v in enumerate(value)}, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield tag, value


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN or infinity
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _truncate_metrics(path: Path, step: int) -> list[int]:
    """Drop records after ``step`` (a killed run may have logged past its last checkpoint) and
    lines that are not records (a run killed while writing one leaves half a line); returns the
    numbers of the latter."""
    if not path.exists():
        return []
    keep, unreadable = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
            if not isinstance(record_step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            unreadable.append(i)
            continue
        if record_step <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return unreadable


# ---- the run -----------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run training as configured; returns the run directory."""
    d = setup_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as held:
            on_rank0(d, lambda: held.enter_context(lock_run_dir(Path(cfg.out_dir))))
            # A GGUF init is dequantised once, by rank 0, beside the run directory, and kept for
            # the whole run: every checkpoint's export takes its tokenizer from that copy.
            init = cfg.model.init and on_rank0(d, lambda: str(held.enter_context(dense_source(
                cfg.model.init, beside=Path(cfg.out_dir), what="model.init", log=lambda s: note(d, s),
                progress=cfg.progress))))
            return _train(cfg, resume, d, init)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Run:
    """What ``setup`` builds and every step uses. ``step`` (optimizer steps done), ``samples``
    (sequences read: the data position), ``tokens`` and ``bad_in_row`` are the trainer's state
    that a checkpoint restores besides weights and optimizer; ``samples`` and ``tokens`` are
    ``step`` times the batch unless a resume changed the batch (``config_changes`` says when)."""

    cfg: TrainConfig
    d: Dist
    plan: RunPlan
    model: torch.nn.Module  # sharded under FSDP2 when d.world > 1
    mcfg: ModelConfig
    optimizer: torch.optim.Optimizer
    mixture: Mixture
    val_sets: dict[str, list[torch.Tensor]]
    run_dir: Path
    val_token_bytes: dict[str, torch.Tensor] = field(default_factory=dict)  # for val_bpb
    step: int = 0
    bad_in_row: int = 0
    samples: int = 0
    tokens: int = 0
    config_changes: list[dict] = field(default_factory=list)  # [{"step": N, "changes": {key: [old, new]}}]
    unlogged_changes: dict | None = None  # this resume's changes, for the next metrics record
    # Each MoE layer's selection bias (the model's buffers, updated in place by aux-loss-free
    # balancing); a checkpoint keeps them in its export's ROUTER_BIAS_FILE.
    biases: list[torch.Tensor] = field(default_factory=list)

    def autocast(self):
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16) if self.plan.bf16 else nullcontext()

    def trainer_state(self) -> dict:  # a checkpoint's trainer.json
        state = {"step": self.step, "tokens": self.tokens, "bad_in_row": self.bad_in_row,
                 "world_size": self.d.world, "config": self.cfg.to_dict()}
        if self.config_changes:  # else samples is step x global batch, as every run before changes
            state.update(samples=self.samples, config_changes=self.config_changes)
        return state


def setup(cfg: TrainConfig, resume: bool, d: Dist, init: str | None = None) -> Run:
    """Everything before the first step: data, model, plan, compile and sharding, optimizer, and
    the newest intact checkpoint's state when resuming. Rank 0 writes config.yaml."""
    run_dir = Path(cfg.out_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not resume and (checkpoints(run_dir) or metrics_path.exists()):
        raise UserError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                        "or choose another out_dir")
    ckpt, saved, changes = None, None, []
    if resume:
        ckpt = on_rank0(d, lambda: _choose_checkpoint(run_dir, d))
    if ckpt is not None:
        saved = json.loads((ckpt / "trainer.json").read_text())
        changes = resume_changes(saved.get("config", {}), cfg, ckpt.name)  # the same on every rank

    t0 = time.perf_counter()
    # One tokenizer for the whole run: the init checkpoint's and every dataset's must agree, or
    # the exports would pair the weights with the wrong vocabulary.
    init = init or cfg.model.init  # a GGUF's dequantised copy (``train``) or the checkpoint itself
    check_tokenizers(init, [spec.path for spec in cfg.data.datasets])
    sources, data_info = open_data(cfg)
    model = make_model(cfg, data_info["vocab_size"], init)
    mcfg = model.config
    params = sum(p.numel() for p in model.parameters())
    phase(d, f"model {cfg.model.init or cfg.model.preset}: {mcfg.model_type}, {params / 1e6:.1f}M parameters", t0)
    check_token_ids(cfg, mcfg.vocab_size)
    plan = plan_run(cfg, mcfg, d.world, d.device.type)
    mixture = Mixture(sources, plan.seq_len, cfg.seed)
    val_sets = open_validation(cfg, plan.seq_len, plan.micro_batch)

    if plan.activation_checkpointing != "none":
        model.set_activation_checkpointing(plan.activation_checkpointing, plan.checkpoint_every)
        layers = sum(layer.checkpointing != "none" for layer in model.model.layers)
        phase(d, f"activation checkpointing ({plan.activation_checkpointing}) on {layers} of "
                 f"{mcfg.num_hidden_layers} decoder layers", t0)
    if plan.compile:
        model.compile_layers()  # before sharding, so FSDP2's per-layer hooks stay outside the graphs
        phase(d, "torch.compile per decoder layer: the first steps compile, then run fast", t0)
    model = place_model(model, d, plan.bf16, init)
    if d.world > 1 or init is not None:
        how = f"sharded with FSDP2 over {d.world} processes" if d.world > 1 else f"on {d.device}"
        phase(d, how + (f", weights read from {cfg.model.init}" if init is not None else ""), t0)
    optimizer = build_optimizer(model, cfg.optim, plan.lr_max, d.device.type)
    run = Run(cfg, d, plan, model, mcfg, optimizer, mixture, val_sets, run_dir,
              val_token_bytes=validation_token_bytes(cfg, val_sets), biases=selection_biases(model))
    if cfg.loss.bias_update_rate:
        note(d, f"aux-loss-free balancing at loss.bias_update_rate {cfg.loss.bias_update_rate}: each checkpoint's "
                f"per-layer selection biases are written beside its export, model/{ROUTER_BIAS_FILE}; dropup's "
                f"loader applies them, transformers and other loaders ignore the file ({mcfg.model_type} "
                "configs have no slot for them) and route without them")

    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        # The biases are not in the DCP state: the export holds them in float32, bit for bit; a
        # checkpoint without the file (no bias yet, or written before biases) starts them at zero.
        load_router_bias(model, ckpt / "model")
        apply_settings(optimizer, cfg.optim)
        _restore(run, state, saved, changes)
        phase(d, f"resumed from {ckpt} at step {run.step} ({run.tokens:,} tokens)", t0)
    if d.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        unreadable = _truncate_metrics(metrics_path, run.step)
        if unreadable:
            note(d, f"warning: dropped line {', '.join(map(str, unreadable))} of {metrics_path}: not a "
                    "complete record (a run killed while logging leaves half a line)")
    return run


def _choose_checkpoint(run_dir: Path, d: Dist) -> Path | None:
    path, notes = find_resumable(run_dir)
    for line in notes:
        note(d, f"warning: {line}")
    return path


def _restore(run: Run, state: dict, saved: dict, changes: list[Change]) -> None:
    """The trainer's state from a checkpoint's trainer.json, and this resume's changes."""
    old_batch = saved.get("config", {}).get("batch", {}).get("global_batch", run.plan.global_batch)
    run.step, run.bad_in_row = state["step"], state["bad_in_row"]
    run.samples = state.get("samples", run.step * old_batch)
    run.tokens = state.get("tokens", run.step * run.plan.tokens_per_step)
    run.config_changes = list(state.get("config_changes", []))
    if not changes:
        return
    diff = {c.key: [c.old, c.new] for c in changes}
    run.config_changes.append({"step": run.step, "changes": diff})
    run.unlogged_changes = diff
    text = f"resuming from step {run.step} with changed settings: {', '.join(map(str, changes))}"
    if any(c.kind == "schedule" for c in changes):
        text += (f"; the LR schedule (warm-up, then cosine to min_lr at step {run.plan.total_steps}) "
                 f"changes from step {run.step} on")
    if any(c.kind == "fixed" for c in changes):
        text += (f"; allow_resume_changes: reading on from sample {run.samples}, the run no longer "
                 "continues as it began")
    note(run.d, text)


def check_token_ids(cfg: TrainConfig, vocab_size: int) -> None:
    """Every split's largest token id against the model's vocabulary (an id past it would index
    past the embedding: an IndexError on a CPU, a device-side assert on a GPU)."""
    for spec in cfg.data.datasets:
        for split in TokenFile(spec.path, "train").meta["splits"]:
            TokenFile(spec.path, split).check_vocab(vocab_size)


@dataclass(frozen=True)
class StepResult:
    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float
    finite: bool  # False: loss or gradient norm was NaN/inf and the update was skipped


def train_step(run: Run, stats: RouterStats | None = None) -> StepResult:
    """Optimizer step ``run.step + 1`` at the LR already set: this rank's micro-batches of the global
    batch, the losses averaged over all ranks, gradient clipping, and the update unless non-finite.
    ``stats`` (if given) collects the routing of this rank's micro-batches. With aux-loss-free
    balancing the selection biases move after the update, from the loads of the whole step."""
    cfg, plan, d, model = run.cfg, run.plan, run.d, run.model
    k, E = run.mcfg.num_experts_per_tok, run.mcfg.num_experts
    step_no = run.step + 1
    z_coef = cfg.loss.z_loss_coef
    rate, biases = cfg.loss.bias_update_rate, run.biases  # the counts below follow the biased routing
    loads = None  # [layers, E] assignments per expert over this rank's micro-batches (float64: exact)
    gb_counts = GlobalBatchCounts()  # the global-batch balance loss counts this step's micro-batches only
    sums = torch.zeros(3, device=d.device)  # lm, aux, z over this rank's micro-batches
    for m in range(plan.accum):
        j = m * d.world + d.rank  # the micro-batch's index within the global batch
        batch = run.mixture.batch(run.samples + j * plan.micro_batch, plan.micro_batch)
        batch = batch.to(d.device)
        with run.autocast():  # the loss comes chunked from the model: no full logits in memory
            lm, router_logits = model(batch[:, :-1], return_router_logits=True, targets=batch[:, 1:])
        aux = z = torch.zeros((), device=d.device)
        if router_logits:
            fractions = None
            if cfg.loss.balance_mode == "global-batch":
                fractions = gb_counts.fractions(router_logits, k, E, biases)
            aux = load_balancing_loss(router_logits, k, E, cfg.loss.balance_mode, token_fractions=fractions,
                                      biases=biases)
            if z_coef:
                z = router_z_loss(router_logits)
            if rate:
                counts = expert_counts(router_logits, k, E, biases=biases).double()
                loads = counts if loads is None else loads + counts
            if stats is not None:
                stats.add(router_logits, k, E, biases)
        loss = lm + plan.aux_coef * aux + z_coef * z
        if step_no in cfg.inject_nan_steps and m == 0:
            loss = loss * float("nan")  # fault injection (tests): poisons this step's gradients
        (loss / plan.accum).backward()
        sums += torch.stack([lm.detach(), aux.detach(), z.detach()]).float()
    sums = d.all_reduce_sum(sums) / (plan.accum * d.world)
    params = [p for p in model.parameters() if p.requires_grad]
    # clip_grad_norm_ in its two halves: the norm now, the scaling only once the norm is known to
    # need it. clip_grad_norm_ always multiplies the gradients, by exactly 1.0 under the limit: a
    # no-op that still reads and writes every gradient (a quarter of the AdamW update's time in
    # the 8x1.5B profile), skipped here. Where the limit binds, the scaling is clip_grad_norm_'s.
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    grad_norm = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm  # FSDP
    lm_v, aux_v, z_v = sums.tolist()  # the one host synchronisation per optimizer step
    loss_v = lm_v + plan.aux_coef * aux_v + z_coef * z_v
    if step_no in cfg.inject_nan_steps:
        loss_v = float("nan")
    norm_v = grad_norm.item()
    finite = math.isfinite(loss_v) and math.isfinite(norm_v)
    if finite:
        # Its factor is min(1, clip / (norm + 1e-6)); it is exactly 1 whenever this is false.
        if not norm_v + 1e-6 < cfg.optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, total_norm)
        run.optimizer.step()
        if loads is not None:
            # Summed over the ranks first, so every rank applies the same update and holds the
            # same biases. A skipped step moves nothing, the biases included.
            with torch.no_grad():
                for bias, delta in zip(biases, bias_step(d.all_reduce_sum(loads), rate)):
                    bias.add_(delta)
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_v, lm_v, aux_v, z_v, norm_v, finite)


def evaluate(run: Run) -> tuple[dict[str, float], dict[str, float]]:
    """Mean next-token loss on each dataset's validation batches (the mean of the batches' means),
    and bits per byte (summed NLL over summed bytes, as ``dropup eval`` computes it: the same
    functions) for the datasets with a byte table, over all ranks."""
    model, d = run.model, run.d
    model.eval()
    losses, bpbs = {}, {}
    with torch.no_grad(), run.autocast():
        for name, batches in run.val_sets.items():
            table = run.val_token_bytes.get(name)
            # Every rank runs the same number of forwards (FSDP all-gathers are collective);
            # a rank without a batch of its own repeats one and gives it weight 0.
            acc = torch.zeros(2, device=d.device)
            nll_bytes = torch.zeros(2, dtype=torch.float64, device=d.device)
            for i in range(math.ceil(len(batches) / d.world) * d.world)[d.rank :: d.world]:
                batch = batches[min(i, len(batches) - 1)]
                loss, nll = window_nll(model, batch.to(d.device))
                if i < len(batches):
                    acc += torch.stack([loss, torch.ones((), device=d.device)])
                    if table is not None:
                        nll_bytes += torch.stack([nll.double(), torch.tensor(
                            float(target_bytes(table, batch)), dtype=torch.float64, device=d.device)])
            acc = d.all_reduce_sum(acc)
            losses[name] = (acc[0] / acc[1]).item()
            if table is not None:
                nll_sum, n_bytes = d.all_reduce_sum(nll_bytes).tolist()
                bpb = bits_per_byte(nll_sum, int(n_bytes))
                if bpb is not None:
                    bpbs[name] = bpb
    model.train()
    return losses, bpbs


def analyse_checkpoint(run: Run, export: Path) -> dict | None:
    """``analysis.routing``: the routing analysis of the export just saved, on the same number
    of val tokens of every dataset that has a val split; its summary is appended to
    analysis/routing.jsonl (lines of later steps, left by a run resumed from an earlier
    checkpoint, are dropped first)."""
    from dropup.analysis.specialisation import RoutingOptions, analyze_routing

    data = [d.path for d in run.cfg.data.datasets if "val" in read_meta(d.path)["splits"]]
    if not data:
        return None
    tokens = min(run.cfg.analysis.tokens, *(len(TokenFile(p, "val")) for p in data))
    root = run.run_dir / "analysis"
    result = analyze_routing(RoutingOptions([str(export)], data, str(root / f"step_{run.step}" / "routing"),
                                            tokens=tokens, seq_len=run.plan.seq_len, device=run.d.device.type,
                                            overwrite=True))
    m = result["models"][0]
    summary = {"step": run.step, "tokens": run.tokens, "tokens_per_domain": tokens, "domains": result["domains"],
               "layers": m["layers"], "mean_jsd": m["mean_jsd"], "jsd": m["jsd"], "dead_total": m["dead_total"],
               "dead_count": m["dead_count"]}
    log = root / "routing.jsonl"
    lines = [line for line in (log.read_text().splitlines() if log.exists() else [])
             if line.strip() and json.loads(line).get("step", 0) < run.step]
    atomic_write_text(log, "".join(f"{line}\n" for line in lines + [json.dumps(summary)]))
    return summary


def _train(cfg: TrainConfig, resume: bool, d: Dist, init: str | None = None) -> Path:
    run = setup(cfg, resume, d, init)
    plan = run.plan
    log = _Log(run.run_dir / "metrics.jsonl", plan.total_steps, run.step, enabled=d.rank == 0, bar=cfg.progress,
               tensorboard_dir=run.run_dir / "tensorboard" if cfg.log.tensorboard else None)
    export_dtype = getattr(torch, cfg.export_dtype)
    run.model.train()
    window_time, window_steps = 0.0, 0
    try:
        while run.step < plan.total_steps:
            t0 = time.perf_counter()
            lr = lr_at(run.step, plan.total_steps, plan.lr_max, plan.lr_min, cfg.optim.warmup_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            step_no = run.step + 1  # 1-based in logs and checkpoint names
            eval_now = bool(run.val_sets) and (step_no == plan.total_steps or (cfg.eval_interval > 0 and
                                                                               step_no % cfg.eval_interval == 0))
            log_now = step_no % cfg.log_interval == 0 or step_no == plan.total_steps or eval_now
            stats = RouterStats() if (log_now and run.mcfg.is_moe) else None
            out = train_step(run, stats)
            run.step = step_no
            run.samples += plan.global_batch
            run.tokens += plan.tokens_per_step
            run.bad_in_row = 0 if out.finite else run.bad_in_row + 1
            window_time += time.perf_counter() - t0
            window_steps += 1
            log.tick(run.step)

            if log_now or not out.finite:
                record = {"step": run.step, "tokens": run.tokens, "lr": lr, "loss": out.loss,
                          "lm_loss": out.lm_loss, "aux_loss": out.aux_loss, "grad_norm": out.grad_norm,
                          "tokens_per_s": window_steps * plan.tokens_per_step / window_time if window_time else None}
                if cfg.loss.z_loss_coef:
                    record["z_loss"] = out.z_loss
                if not out.finite:
                    record["skipped"] = True
                if stats is not None:
                    record.update(stats.reduce() or {})
                    # The router_* lists have one entry per MoE layer; these are their layer indices.
                    record["router_layers"] = run.mcfg.moe_layers
                if cfg.loss.bias_update_rate:
                    record["router_bias_max"] = [round(x, 6) for x in
                                                 torch.stack(run.biases).abs().amax(-1).tolist()]
                if eval_now:
                    record["val_loss"], bpb = evaluate(run)
                    if bpb:
                        record["val_bpb"] = bpb
                if run.unlogged_changes:
                    record["config_changes"], run.unlogged_changes = run.unlogged_changes, None
                log.write(record)
                window_time, window_steps = 0.0, 0
            if run.bad_in_row >= cfg.max_bad_steps:
                last = checkpoints(run.run_dir)
                where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
                raise UserError(f"stopped at step {run.step}: {run.bad_in_row} steps in a row had a non-finite "
                                f"loss or gradient norm; {where}. Lower optim.lr or check the data")
            if (cfg.save_interval and run.step % cfg.save_interval == 0) or run.step == plan.total_steps:
                saved = save_checkpoint(run.run_dir, run.step, run.model, run.optimizer, run.trainer_state(),
                                        export_dtype, cfg.keep_last)
                if cfg.analysis.routing and run.mcfg.is_moe:
                    on_rank0(d, lambda: analyse_checkpoint(run, saved / "model"))
    finally:
        log.close()
    return run.run_dir
