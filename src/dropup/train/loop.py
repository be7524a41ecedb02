"""``dropup train``: the paper's training recipe for dense and MoE models, on one or more devices.

Recipe (the Drop-Upcycling paper's defaults): AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1 on
matrices only (not norms or biases), gradient clipping 1.0, linear warm-up then cosine decay to
a minimum LR, bf16 autocast with fp32 master weights on GPU, gradient accumulation to a global
batch, next-token loss plus the load-balancing loss (coefficient 0.02) for MoE models.

Several processes (``torchrun --nproc-per-node N -m dropup train ...``) shard the model with
FSDP2; micro-batch j of a step goes to rank j % N, so any number of processes computes the same
global batch. A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` and
``ckpt/step_N/`` (see ``dropup.runckpt``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from dropup.hub.config import ModelConfig
from dropup.data.tokens import Mixture, Source, TokenFile, validation_batches
from dropup.errors import UserError
from dropup.model.io import load_model
from dropup.train.optim import AdamW as LowMemAdamW
from dropup.analysis.routing import RouterStats
from dropup.train.losses import GlobalBatchCounts, load_balancing_loss, router_z_loss
from dropup.model.decoder import CausalLM, DecoderLayer, build_model
from dropup.train.checkpoints import checkpoints, load_checkpoint, save_checkpoint
from dropup.train.config import PRESETS, TrainConfig

# ---- the recipe --------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_steps``,
    then cosine decay reaching ``min_lr`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and stacked experts); none on norms and biases (1-D tensors),
    whose scale is not what over-fits and which decay would pull towards zero."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, device: torch.device):
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.state_dtype == "bfloat16":  # 12 instead of 16 bytes per parameter (see dropup.optim)
        return LowMemAdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, state_dtype=torch.bfloat16)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda")


def default_lrs(cfg: TrainConfig, is_moe: bool) -> tuple[float, float]:
    # The paper trains MoE models at 2e-4 -> 2e-5 and its dense seeds at 3e-4 -> 3e-5.
    lr = cfg.optim.lr if cfg.optim.lr is not None else (2e-4 if is_moe else 3e-4)
    return lr, cfg.optim.min_lr if cfg.optim.min_lr is not None else lr / 10


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


def open_data(cfg: TrainConfig) -> tuple[list[Source], dict]:
    sources = [Source(d.name, TokenFile(d.path, "train"), d.weight) for d in cfg.data.datasets]
    metas = [s.file.meta for s in sources]
    vocab = max(m["vocab_size"] for m in metas)
    return sources, {"vocab_size": vocab}


def make_model(cfg: TrainConfig, data_vocab: int) -> CausalLM:
    torch.manual_seed(cfg.seed)  # the from-scratch initialisation is a function of the seed
    m = cfg.model
    if m.init is not None:
        model = load_model(m.init, device="cpu", dtype=torch.float32, moe_impl=m.moe_impl)
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


def shard(model: CausalLM, d: Dist, bf16: bool) -> torch.nn.Module:
    """FSDP2: each decoder layer is one all-gather unit; the root holds embeddings and head."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


# ---- the run -----------------------------------------------------------------------------------


class _Log:
    """metrics.jsonl (rank 0) plus a progress bar on a terminal or a plain line per log step."""

    def __init__(self, path: Path, total: int, start: int, enabled: bool, bar: bool):
        self.path, self.enabled = path, enabled
        self.progress = None
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


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN or infinity
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step``: a killed run may have logged past its last checkpoint."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run training as configured; returns the run directory."""
    d = setup_distributed(cfg.device)
    try:
        return _train(cfg, resume, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, d: Dist) -> Path:
    run_dir = Path(cfg.out_dir)
    metrics_path = run_dir / "metrics.jsonl"
    found = checkpoints(run_dir)
    if not resume and (found or metrics_path.exists()):
        raise UserError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                        "or choose another out_dir")

    sources, data_info = open_data(cfg)
    model = make_model(cfg, data_info["vocab_size"])
    mcfg = model.config
    seq_len = cfg.data.seq_len or mcfg.max_position_embeddings
    G, mb = cfg.batch.global_batch, cfg.batch.micro_batch
    if G % (mb * d.world):
        raise UserError(f"batch.global_batch ({G}) must be a multiple of batch.micro_batch ({mb}) times "
                        f"the number of processes ({d.world})")
    accum = G // (mb * d.world)
    total_steps = cfg.steps if cfg.steps is not None else cfg.tokens // (G * seq_len)
    if total_steps < 1:
        raise UserError(f"tokens ({cfg.tokens}) is less than one global batch ({G} x {seq_len} tokens)")
    mixture = Mixture(sources, seq_len, cfg.seed)
    val_sets = {}
    for spec in cfg.data.datasets:
        meta_splits = TokenFile(spec.path, "train").meta["splits"]
        if "val" in meta_splits:
            batches = validation_batches(TokenFile(spec.path, "val"), seq_len, mb, cfg.data.eval_batches)
            if batches:
                val_sets[spec.name] = batches

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    if cfg.compile or (cfg.compile is None and d.device.type == "cuda"):
        model.compile_layers()  # before sharding, so FSDP2's per-layer hooks stay outside the graphs
    if d.world > 1:
        model = shard(model, d, bf16)  # moves the shards to the mesh's device
    else:
        model.to(d.device)
    lr_max, lr_min = default_lrs(cfg, mcfg.is_moe)
    optimizer = build_optimizer(model, cfg, lr_max, d.device)
    aux_coef = cfg.loss.aux_loss_coef if cfg.loss.aux_loss_coef is not None else mcfg.router_aux_loss_coef
    k, E = mcfg.num_experts_per_tok, mcfg.num_experts

    step, bad_in_row = 0, 0
    if resume and found:
        state = load_checkpoint(found[-1][1], model, optimizer)
        step, bad_in_row = state["step"], state["bad_in_row"]
    if d.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _truncate_metrics(metrics_path, step)
    log = _Log(metrics_path, total_steps, step, enabled=d.rank == 0, bar=cfg.progress)

    autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else nullcontext())
    export_dtype = getattr(torch, cfg.export_dtype)
    gb_counts = GlobalBatchCounts()
    params = [p for p in model.parameters() if p.requires_grad]

    def trainer_state() -> dict:
        return {"step": step, "tokens": step * G * seq_len, "bad_in_row": bad_in_row, "world_size": d.world,
                "config": cfg.to_dict()}

    def evaluate() -> dict[str, float]:
        model.eval()
        out = {}
        with torch.no_grad(), autocast:
            for name, batches in val_sets.items():
                # Every rank runs the same number of forwards (FSDP all-gathers are collective);
                # a rank without a batch of its own repeats one and gives it weight 0.
                acc = torch.zeros(2, device=d.device)
                for i in range(math.ceil(len(batches) / d.world) * d.world)[d.rank :: d.world]:
                    batch = batches[min(i, len(batches) - 1)].to(d.device)
                    loss = model(batch[:, :-1], targets=batch[:, 1:])
                    if i < len(batches):
                        acc += torch.stack([loss.float(), torch.ones((), device=d.device)])
                acc = d.all_reduce_sum(acc)
                out[name] = (acc[0] / acc[1]).item()
        model.train()
        return out

    model.train()
    window_time, window_steps = 0.0, 0
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, lr_max, lr_min, cfg.optim.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_no = step + 1  # 1-based in logs and checkpoint names
            eval_now = bool(val_sets) and (step_no == total_steps or (cfg.eval_interval > 0 and
                                                                      step_no % cfg.eval_interval == 0))
            log_now = step_no % cfg.log_interval == 0 or step_no == total_steps or eval_now
            stats = RouterStats() if (log_now and mcfg.is_moe) else None
            gb_counts.reset()
            sums = torch.zeros(3, device=d.device)  # lm, aux, z over this rank's micro-batches
            for m in range(accum):
                j = m * d.world + d.rank  # the micro-batch's index within the global batch
                batch = mixture.batch(step * G + j * mb, mb).to(d.device)
                with autocast:  # the loss comes chunked from the model: no full logits in memory
                    lm, router_logits = model(batch[:, :-1], return_router_logits=True,
                                              targets=batch[:, 1:])
                aux = z = torch.zeros((), device=d.device)
                if router_logits:
                    fractions = None
                    if cfg.loss.balance_mode == "global-batch":
                        fractions = gb_counts.fractions(router_logits, k, E)
                    aux = load_balancing_loss(router_logits, k, E, cfg.loss.balance_mode, token_fractions=fractions)
                    if cfg.loss.z_loss_coef:
                        z = router_z_loss(router_logits)
                    if stats is not None:
                        stats.add(router_logits, k, E)
                loss = lm + aux_coef * aux + cfg.loss.z_loss_coef * z
                if step_no in cfg.inject_nan_steps and m == 0:
                    loss = loss * float("nan")  # fault injection (tests): poisons this step's gradients
                (loss / accum).backward()
                sums += torch.stack([lm.detach(), aux.detach(), z.detach()]).float()
            sums = d.all_reduce_sum(sums) / (accum * d.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            lm_v, aux_v, z_v = sums.tolist()  # the one host synchronisation per optimizer step
            loss_v = lm_v + aux_coef * aux_v + cfg.loss.z_loss_coef * z_v
            if step_no in cfg.inject_nan_steps:
                loss_v = float("nan")
            norm_v = grad_norm.item()
            finite = math.isfinite(loss_v) and math.isfinite(norm_v)
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            step = step_no
            window_time += time.perf_counter() - t0
            window_steps += 1
            log.tick(step)

            if log_now or not finite:
                record = {"step": step, "tokens": step * G * seq_len, "lr": lr, "loss": loss_v, "lm_loss": lm_v,
                          "aux_loss": aux_v, "grad_norm": norm_v,
                          "tokens_per_s": window_steps * G * seq_len / window_time if window_time else None}
                if cfg.loss.z_loss_coef:
                    record["z_loss"] = z_v
                if not finite:
                    record["skipped"] = True
                if stats is not None:
                    record.update(stats.reduce() or {})
                if eval_now:
                    record["val_loss"] = evaluate()
                log.write(record)
                window_time, window_steps = 0.0, 0
            if bad_in_row >= cfg.max_bad_steps:
                last = checkpoints(run_dir)
                where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
                raise UserError(f"stopped at step {step}: {bad_in_row} steps in a row had a non-finite loss or "
                                f"gradient norm; {where}. Lower optim.lr or check the data")
            if (cfg.save_interval and step % cfg.save_interval == 0) or step == total_steps:
                save_checkpoint(run_dir, step, model, optimizer, trainer_state(), export_dtype, cfg.keep_last)
    finally:
        log.close()
    return run_dir
