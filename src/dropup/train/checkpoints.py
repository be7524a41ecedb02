"""Checkpoints of a training run: ``<out_dir>/ckpt/step_N/``.

    step_N/model/        a Hugging Face checkpoint (config.json + safetensors), the full model
    step_N/state/        model and optimizer state via torch.distributed.checkpoint, so a run can
                         resume on a different number of processes (DCP reshards on load)
    step_N/trainer.json  step, tokens, consecutive bad steps, config; the data position is the step
                         (the data order is a pure function of seed and sample index)
    step_N/rng_<rank>.pt each rank's torch RNG state

A checkpoint is assembled in ``ckpt/.step_N.tmp`` and renamed into place when complete, so a
``step_N`` directory is always whole; a killed save leaves only the dot-directory.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from dropup.hub.atomic import atomic_dir
from dropup.model.io import save_model

_STEP_DIR = re.compile(r"step_(\d+)")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "ckpt"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / "trainer.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict,
                    export_dtype: torch.dtype, keep_last: int) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it) and prune old ones."""
    root = Path(run_dir) / "ckpt"
    final, tmp_name = root / f"step_{step}", f".step_{step}.tmp"
    # Rank 0 owns the directory (a re-run of the same step after a resume replaces it); every
    # rank writes its part of state/ into it, so its name is one they all know.
    with (atomic_dir(final, existing="replace", tmp_name=tmp_name) if _rank() == 0
          else contextlib.nullcontext(root / tmp_name)) as tmp:
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # DCP warns that one process means no collectives: intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"),
                     no_dist=not dist.is_initialized())
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng_{_rank()}.pt")
        # Gathers the full (unsharded) model onto rank 0's CPU: collective.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if _rank() == 0:
            save_model(model, tmp / "model", state_dict=full, dtype=export_dtype)
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    if _rank() == 0:
        for _, old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; return trainer.json."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "state"), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_{_rank()}.pt"
    if rng_file.exists():  # absent when resuming on more processes than the run had
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "trainer.json").read_text())
