"""Checkpoints of a training run: ``<out_dir>/ckpt/step_N/``.

    step_N/model/        a complete Hugging Face checkpoint of the full model: config.json,
                         safetensors, the run's tokenizer files, generation_config.json and a
                         model card (README.md), usable as it is by transformers, vLLM or lm-eval
    step_N/state/        model and optimizer state via torch.distributed.checkpoint, so a run can
                         resume on a different number of processes (DCP reshards on load)
    step_N/trainer.json  step, tokens, consecutive bad steps, config; the data position is the step
                         (the data order is a pure function of seed and sample index)
    step_N/rng_<rank>.pt each rank's torch RNG state
    step_N/manifest.json the size and SHA-256 of every other file, written last

A checkpoint is assembled in ``ckpt/.step_N.tmp`` and renamed into place when complete, so a
``step_N`` directory is always whole; a killed save leaves only the dot-directory. What the rename
cannot catch (a file damaged or truncated later, on the disk or by a copy) the manifest does:
``--resume`` verifies it and falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from dropup.errors import UserError
from dropup.hub import card
from dropup.hub.atomic import atomic_dir
from dropup.hub.digest import sha256_file
from dropup.model.io import ROUTER_BIAS_FILE, save_model

_STEP_DIR = re.compile(r"step_(\d+)")
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "dropup-checkpoint-manifest"


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
        if m and p.is_dir():  # only a complete save is renamed to step_N; verify_checkpoint checks it
            found.append((int(m.group(1)), p))
    return sorted(found)


@dataclass
class ModelRef:
    """A Hugging Face model directory to evaluate or analyse, and where it came from."""

    path: Path  # the model directory (config.json)
    label: str  # RUN/step_N for a run's checkpoint (given as the run or as its export), else its name
    run: Path | None = None  # the training run directory, for a run's checkpoint
    step: int | None = None
    tokens_trained: int | None = None  # trainer.json's tokens, for a run's checkpoint


def model_refs(paths: list[str | Path]) -> list[ModelRef]:
    """What `dropup eval` and `dropup analyze` accept as CKPT: Hugging Face model directories as
    given, and training run directories, each of which stands for its saved checkpoints'
    exports (``ckpt/step_N/model``) in step order. ``UserError`` for anything else."""
    out = []
    for given in paths:
        p = Path(given)
        if (p / "config.json").is_file():
            r = p.resolve()
            export = r.name == "model" and r.parent.parent.name == "ckpt" and _STEP_DIR.fullmatch(r.parent.name)
            if export:
                run, step = r.parent.parent.parent, int(export.group(1))
                out.append(ModelRef(p, f"{run.name}/step_{step}", run, step, _tokens_trained(r.parent)))
            else:
                out.append(ModelRef(p, r.name or str(p)))
            continue
        if not p.is_dir():
            raise UserError(f"checkpoint {given} is not a directory; pass a Hugging Face checkpoint or a "
                            "training run directory")
        found = [(step, c) for step, c in checkpoints(p) if (c / "model" / "config.json").is_file()]
        if not found:
            raise UserError(f"{given} is neither a Hugging Face checkpoint (no config.json) nor a training run "
                            "directory with saved checkpoints (no ckpt/step_N/model); pass a checkpoint "
                            "directory, or a run after its first checkpoint (save_interval)")
        name = p.resolve().name
        out += [ModelRef(c / "model", f"{name}/step_{step}", p, step, _tokens_trained(c)) for step, c in found]
    labels = [m.label for m in out]
    for i, m in enumerate(out):  # one name from different places: number them
        if labels.count(m.label) > 1:
            m.label = f"{m.label}#{labels[: i + 1].count(m.label)}"
    return out


def _tokens_trained(ckpt: Path) -> int | None:
    try:
        tokens = json.loads((ckpt / "trainer.json").read_text()).get("tokens")
    except (OSError, ValueError, AttributeError):
        return None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


# ---- the manifest ------------------------------------------------------------------------------
#
# Cost: one more read of the checkpoint right after it is written (mostly from the page cache)
# and one on resume, at SHA-256 speed: about 1.7 GB/s per core with the CPU's SHA extensions.
# hashlib releases the GIL, so files are hashed in parallel threads (DCP writes one file per
# rank). For the paper's 8x1.5B on 8 GPUs (about 145 GB of export, weights and AdamW moments)
# that is some 10-15 s per checkpoint when the page cache holds it, against the minutes between
# checkpoints; hashing while writing would need hooks inside DCP's writer.



def _hash_all(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1, 16))) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(ckpt: Path) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(ckpt).as_posix(): {"bytes": p.stat().st_size, "sha256": h}
               for p, h in zip(files, _hash_all(files))}
    (ckpt / MANIFEST).write_text(json.dumps({"format": _MANIFEST_FORMAT, "version": 1, "files": entries},
                                            indent=1) + "\n")


def verify_checkpoint(ckpt: Path) -> tuple[bool, str | None]:
    """(verified, problem): (True, None) when every file matches the manifest; (False, None) for a
    checkpoint without one (written before manifests; loadable, unverified); (False, why) when
    it cannot be trusted, ``why`` naming the file."""
    try:
        json.loads((ckpt / "trainer.json").read_text())
    except FileNotFoundError:
        return False, f"{ckpt.name}/trainer.json is missing"
    except (OSError, ValueError):
        return False, f"{ckpt.name}/trainer.json is damaged (not readable JSON)"
    if not (ckpt / MANIFEST).exists():
        return False, (None if (ckpt / "state" / ".metadata").is_file() else f"{ckpt.name}/state/.metadata is missing")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["format"] != _MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a checkpoint manifest")
        expected = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"{ckpt.name}/{MANIFEST} is damaged"
    for name, size, _ in expected:  # sizes first: a truncated file is found without reading anything
        p = ckpt / name
        if not p.is_file():
            return False, f"{ckpt.name}/{name} is missing"
        if p.stat().st_size != size:
            return False, f"{ckpt.name}/{name} is truncated or damaged ({p.stat().st_size} bytes, {size} written)"
    for (name, _, want), got in zip(expected, _hash_all([ckpt / n for n, _, _ in expected])):
        if got != want:
            return False, f"{ckpt.name}/{name} is damaged (its SHA-256 differs from the one written)"
    return True, None


def find_resumable(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of a run that verifies (or has no manifest), and a line for each
    newer one passed over and for an unverified pick. ``UserError`` when checkpoints exist but
    none can be used; (None, []) when there are none."""
    found = checkpoints(run_dir)
    notes, bad = [], []
    for _, path in reversed(found):
        ok, problem = verify_checkpoint(path)
        if problem is not None:
            bad.append(problem)
            continue
        for why in bad:
            notes.append(f"skipped a checkpoint: {why}; resuming from the older {path.name}")
        if not ok:
            notes.append(f"{path.name} has no {MANIFEST} (written by an older dropup): resuming from it unverified")
        return path, notes
    if bad:
        raise UserError(f"--resume: no checkpoint of {run_dir} can be used: {'; '.join(bad)}. Restore the "
                        "files from a copy, or start a new run in another out_dir")
    return None, []


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict,
                    export_dtype: torch.dtype, keep_last: int) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it) and prune old ones. A failed
    write (a full disk) leaves nothing of it and the earlier checkpoints as they were."""
    root = Path(run_dir) / "ckpt"
    final, tmp_name = root / f"step_{step}", f".step_{step}.tmp"
    before = checkpoints(run_dir)

    def fail(e: BaseException) -> BaseException:
        # DCP catches whatever its writers raise and re-raises it wrapped, Ctrl-C and SIGTERM
        # (a KeyboardInterrupt in the CLI) included: those must stay interruptions.
        for wrapped in getattr(e, "failures", {}).values():
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            if isinstance(inner, KeyboardInterrupt):
                return inner
        return _write_error(e, final, before)

    try:
        # Rank 0 owns the directory (a re-run of the same step after a resume replaces it); every
        # rank writes its part of state/ into it, so its name is one they all know.
        with (atomic_dir(final, existing="replace", tmp_name=tmp_name) if _rank() == 0
              else contextlib.nullcontext(root / tmp_name)) as tmp:
            try:  # raised inside the block, so the temporary is removed on the way out
                _write(tmp, model, optimizer, trainer_state, export_dtype)
            except (OSError, CheckpointException) as e:
                raise fail(e) from None
    except (OSError, CheckpointException) as e:  # creating or renaming the directory
        raise fail(e) from None
    if _rank() == 0:
        for _, old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write(tmp: Path, model, optimizer, trainer_state: dict, export_dtype: torch.dtype) -> None:
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
        write_export_side_files(tmp / "model", model.config, full, trainer_state)
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    _barrier()  # every rank's files are complete before rank 0 hashes them
    if _rank() == 0:
        write_manifest(tmp)


def write_export_side_files(export: Path, cfg, state_dict: dict, trainer_state: dict) -> None:
    """Tokenizer files, generation_config.json and README.md for the export ``export`` of a run
    whose config is ``trainer_state["config"]`` (the tokenizer: ``card.run_tokenizer``)."""
    init, datasets = card.run_inputs(trainer_state.get("config") or {})
    # Refused at the start of training (card.check_tokenizers); a mismatch that appears later
    # (a dataset re-prepared under a running job) must not cost the checkpoint.
    try:
        tok = card.check_tokenizers(init, datasets)
    except UserError as e:
        warnings.warn(f"checkpoint export without tokenizer: {e}", stacklevel=2)
        tok = None
    hf_config = json.loads((export / "config.json").read_text())
    card.copy_tokenizer_files(tok, init, export, hf_config, eos_token_id=_data_eos(datasets))
    info = export_card_info(cfg, state_dict, trainer_state)
    if (export / ROUTER_BIAS_FILE).is_file():
        info["training"]["router_bias"] = ROUTER_BIAS_FILE
    card.write_model_card(export, info)


def _data_eos(datasets: list[str]) -> int | None:
    for ds in datasets:
        try:
            eos = json.loads((Path(ds) / "meta.json").read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos, int):
            return eos
    return None


def export_card_info(cfg, state_dict: dict, trainer_state: dict) -> dict:
    """``card.model_card``'s input for a training export; ``cfg`` is the model's ModelConfig."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()
              if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    routed = sum(math.prod(s) for k, s in shapes.items() if ".mlp.experts." in k)
    total, active = card.parameter_counts(shapes, routed, cfg.num_experts, cfg.num_experts_per_tok)
    init, _ = card.run_inputs(trainer_state.get("config") or {})
    upcycling = None
    if init:
        try:
            upcycling = card.upcycling_info(json.loads((Path(init) / "upcycling.json").read_text()))
        except (OSError, ValueError, AttributeError):
            pass  # not upcycled by dropup: a dense or MoE checkpoint from elsewhere
    return {"model_type": cfg.model_type, "layers": cfg.num_hidden_layers, "num_experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok, "total_params": total, "active_params": active,
            "base_model": (upcycling or {}).get("source") or card.model_name(init),
            "upcycling": upcycling,
            "training": {"steps": trainer_state.get("step", 0), "tokens": trainer_state.get("tokens", 0),
                         "init": card.model_name(init)}}


def _write_error(e: BaseException, final: Path, before: list[tuple[int, Path]]) -> BaseException:
    """One line for a checkpoint write that failed in the file system (DCP wraps each rank's
    error in a CheckpointException); anything else as it is."""
    os_error = e if isinstance(e, OSError) else next(
        (f[0] for f in getattr(e, "failures", {}).values() if isinstance(f[0], OSError)), None)
    if os_error is None:
        return e
    step = int(_STEP_DIR.fullmatch(final.name).group(1))
    kept = [p for s, p in before if s < step]
    intact = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists"
    if os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        what, fix = f"the disk filled up while writing checkpoint {final}", "free space"
    else:
        what = f"writing checkpoint {final} failed ({os_error.strerror or os_error})"
        fix = "fix that"
    return UserError(f"{what}; nothing of it was kept and {intact}: {fix}, then run again with --resume")


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; return trainer.json."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path / "state"), no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:
        raise UserError(f"--resume: {path} does not load into this run's model and optimizer "
                        f"({_first_line(e)}); resume with the model and optim.state_dtype it was trained with"
                        ) from None
    rng_file = path / f"rng_{_rank()}.pt"
    if rng_file.exists():  # absent when resuming on more processes than the run had
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "trainer.json").read_text())


def _first_line(e: BaseException) -> str:
    for f in getattr(e, "failures", {}).values():  # a CheckpointException: the first rank's error
        e = f[0]
        break
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
