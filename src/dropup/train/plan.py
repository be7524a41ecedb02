"""The numbers a training run derives from its config, the model and the processes, computed and
checked once before the first step (the loop reads them from here and nowhere else)."""

from __future__ import annotations

from dataclasses import dataclass

from dropup.errors import UserError
from dropup.hub.config import ModelConfig
from dropup.train.config import TrainConfig


@dataclass(frozen=True)
class RunPlan:
    seq_len: int  # tokens per training sequence
    global_batch: int  # sequences per optimizer step, over all processes
    micro_batch: int  # sequences per forward pass on one process
    world: int  # number of processes
    accum: int  # micro-batches per optimizer step on each process
    total_steps: int  # optimizer steps of the whole run
    bf16: bool  # bf16 autocast (weights and optimizer states stay as they are)
    compile: bool  # per-layer torch.compile
    activation_checkpointing: str  # "none", "full" or "selective" (ACTIVATION_CHECKPOINTING)
    checkpoint_every: int  # ... on every checkpoint_every-th decoder layer from layer 0
    lr_max: float  # peak LR, reached at the end of the warm-up
    lr_min: float  # LR at the last step
    aux_coef: float  # weight of the load-balancing loss

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def plan_run(cfg: TrainConfig, model: ModelConfig, world: int, device_type: str) -> RunPlan:
    """The run's plan; ``UserError`` if the config cannot be run on ``world`` processes."""
    seq_len = cfg.data.seq_len or model.max_position_embeddings
    G, mb = cfg.batch.global_batch, cfg.batch.micro_batch
    if G % (mb * world):
        raise UserError(f"batch.global_batch ({G}) must be a multiple of batch.micro_batch ({mb}) times "
                        f"the number of processes ({world})")
    total_steps = cfg.steps if cfg.steps is not None else cfg.tokens // (G * seq_len)
    if total_steps < 1:
        raise UserError(f"tokens ({cfg.tokens}) is less than one global batch ({G} x {seq_len} tokens)")
    if cfg.loss.bias_update_rate and not model.is_moe:
        raise UserError(f"loss.bias_update_rate is {cfg.loss.bias_update_rate} but the model is dense "
                        f"({model.model_type}): aux-loss-free balancing needs an MoE; set it to 0")
    # The paper trains MoE models at 2e-4 -> 2e-5 and its dense seeds at 3e-4 -> 3e-5.
    lr_max = cfg.optim.lr if cfg.optim.lr is not None else (2e-4 if model.is_moe else 3e-4)
    lr_min = cfg.optim.min_lr if cfg.optim.min_lr is not None else lr_max / 10
    on_gpu = device_type == "cuda"
    return RunPlan(
        seq_len=seq_len,
        global_batch=G,
        micro_batch=mb,
        world=world,
        accum=G // (mb * world),
        total_steps=total_steps,
        bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu),
        # compile: None means "where it pays": on CUDA, not on CPU.
        compile=cfg.compile if cfg.compile is not None else on_gpu,
        activation_checkpointing=cfg.activation_checkpointing,
        checkpoint_every=cfg.activation_checkpointing_every,
        lr_max=lr_max,
        lr_min=lr_min,
        aux_coef=cfg.loss.aux_loss_coef if cfg.loss.aux_loss_coef is not None else model.router_aux_loss_coef,
    )
