"""Issue 11 for the trainer, "nothing lost, nothing silently wrong": checksummed checkpoints, a
resume that falls back past a damaged one, resumes with changed settings, the run-directory lock,
every numeric setting checked, and a full disk while a checkpoint is written."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dropup.cli import main as cli_main
from dropup.data.tokens import write_dataset
from dropup.errors import UserError
from dropup.train import checkpoints as ckpt_module
from dropup.train.checkpoints import verify_checkpoint
from dropup.train.config import load_config
from dropup.train.loop import Dist, lock_run_dir, setup, train

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
torch.set_num_threads(1)


def _docs(n: int, seed: int) -> list[list[int]]:
    r = np.random.default_rng(seed)
    return [[int(1 + (r.integers(1, 60) + r.integers(1, 4) * i) % 60) for i in range(r.integers(20, 80))] + [0]
            for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("data")
    return [write_dataset(root / "prose", {"train": _docs(100, 1), "val": _docs(10, 2)}, 64, eos_token_id=0),
            write_dataset(root / "code", {"train": _docs(60, 3)}, 64, eos_token_id=0)]


def _sets(data: list[Path], out: Path, *extra: str) -> list[str]:
    return [f"data.datasets=[{{path: '{data[0]}', weight: 2}}, {{path: '{data[1]}'}}]", "model.preset=moe-tiny",
            "data.seq_len=16", "data.eval_batches=1", "batch.global_batch=4", "batch.micro_batch=2", "steps=6",
            "optim.lr=3e-3", "optim.warmup_steps=2", "save_interval=2", "keep_last=3", "log_interval=1",
            "eval_interval=3", "progress=false", "device=cpu", f"out_dir={out}", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _args(sets: list[str], *flags: str) -> list[str]:
    return ["train", "--config", "/dev/null", *flags, *[x for s in sets for x in ("--set", s)]]  # all in --set


def _cli(capsys, sets: list[str], *flags: str) -> tuple[int, str]:
    code = cli_main(_args(sets, *flags))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6, never to be modified."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_config(None, _sets(data, out)))
    return out


def _copy(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens", "val_loss", "router_load"):
            assert x.get(key) == y.get(key), (x["step"], key)


# ---- 1. checksummed checkpoints ---------------------------------------------------------------


def test_every_checkpoint_file_is_in_its_manifest(reference):
    ckpt = reference / "ckpt" / "step_6"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == files and {"trainer.json", "rng_0.pt", "state/.metadata"} <= files
    assert all(manifest[f]["bytes"] == (ckpt / f).stat().st_size for f in files)
    assert verify_checkpoint(ckpt) == (True, None)
    # trainer.json of a run without resume changes is as before (nothing added).
    assert set(json.loads((ckpt / "trainer.json").read_text())) == {"step", "tokens", "bad_in_row", "world_size",
                                                                   "config"}


# ---- 2. resume falls back to the newest checkpoint that verifies -----------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x40
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, file, says", [
    (_truncate, "state/__0_0.distcp", "state/__0_0.distcp is truncated or damaged"),
    (_flip, "state/__0_0.distcp", "state/__0_0.distcp is damaged (its SHA-256 differs"),
    (_flip, "model/model.safetensors", "model/model.safetensors is damaged"),
    (lambda p: p.unlink(), "rng_0.pt", "rng_0.pt is missing"),
    (lambda p: p.write_text("{"), "trainer.json", "trainer.json is damaged"),
])  # fmt: skip
def test_resume_skips_a_damaged_checkpoint_and_a_half_written_metrics_line(tmp_path, capsys, data, reference,
                                                                            damage, file, says):
    run = _copy(reference, tmp_path)
    damage(run / "ckpt" / "step_6" / file)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "tokens": 4')  # killed while logging
    code, err = _cli(capsys, _sets(data, run), "--resume")
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 2 and f"step_6/{says}" in lines[0] and "resuming from the older step_4" in lines[0], err
    assert "dropped line 7 of" in lines[1] and "half a line" in lines[1], err
    # Steps 5 and 6 trained again from step 4: the same metrics as the run that was never damaged,
    # and step_6 written anew.
    _same_metrics(_metrics(reference), _metrics(run))
    assert verify_checkpoint(run / "ckpt" / "step_6") == (True, None)


def test_resume_stops_with_one_line_when_no_checkpoint_verifies(tmp_path, capsys, data, reference):
    run = _copy(reference, tmp_path)
    for step in (2, 4, 6):
        _truncate(run / "ckpt" / f"step_{step}" / "model" / "model.safetensors")
    before = (run / "metrics.jsonl").read_bytes()
    code, err = _cli(capsys, _sets(data, run), "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert "no checkpoint of" in err and "step_6/model/model.safetensors is truncated" in err, err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_checkpoints_without_a_manifest_still_resume(tmp_path, capsys, data, reference):
    run = _copy(reference, tmp_path)
    for step in (2, 4, 6):  # as an older dropup wrote them
        (run / "ckpt" / f"step_{step}" / "manifest.json").unlink()
    shutil.rmtree(run / "ckpt" / "step_6")
    code, err = _cli(capsys, _sets(data, run), "--resume")
    assert code == 0 and err.count("\n") == 1 and "step_4 has no manifest.json" in err and "unverified" in err, err
    _same_metrics(_metrics(reference), _metrics(run))


# ---- 3. resume with changed settings -----------------------------------------------------------


@pytest.mark.parametrize("change, key", [
    ("seed=1", "seed 0 -> 1"),
    ("batch.global_batch=8", "batch.global_batch 4 -> 8"),
    ("data.seq_len=8", "data.seq_len 16 -> 8"),
    ("model.preset=dense-tiny", 'model.preset "moe-tiny" -> "dense-tiny"'),
    ("optim.state_dtype=bfloat16", "optim.state_dtype"),
])  # fmt: skip
def test_resume_refuses_settings_that_break_exactness(tmp_path, capsys, data, reference, change, key):
    run = _copy(reference, tmp_path)
    shutil.rmtree(run / "ckpt" / "step_6")
    before = (run / "metrics.jsonl").read_bytes()
    code, err = _cli(capsys, _sets(data, run, change), "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert "step_4 was trained with other settings" in err and key in err and "allow_resume_changes" in err, err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_changed_datasets(tmp_path, capsys, data, reference):
    run = _copy(reference, tmp_path)
    sets = _sets(data, run)
    sets[0] = f"data.datasets=[{{path: '{data[0]}', weight: 1}}, {{path: '{data[1]}'}}]"
    code, err = _cli(capsys, sets, "--resume")
    assert code == 2 and "data.datasets[0].weight 2.0 -> 1.0" in err, err
    sets[0] = f"data.datasets=[{{path: '{data[0]}', weight: 2}}]"
    code, err = _cli(capsys, sets, "--resume")
    assert code == 2 and "data.datasets 2 -> 1" in err and "data.datasets[1].path" in err, err


def test_resume_extends_a_run_with_a_notice_about_the_schedule(tmp_path, capsys, data, reference):
    run = _copy(reference, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    # A new schedule is the user's decision: refused with one line naming the key and the flag.
    code, err = _cli(capsys, _sets(data, run, "steps=8", "save_interval=4"), "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert "steps 6 -> 8 changes the learning-rate schedule" in err and "--allow-config-change" in err, err
    assert (run / "metrics.jsonl").read_bytes() == before
    code, err = _cli(capsys, _sets(data, run, "steps=8", "save_interval=4", "batch.micro_batch=1"), "--resume",
                     "--allow-config-change")
    assert code == 0 and err.count("\n") == 1, err
    assert "resuming from step 6 with changed settings:" in err and "steps 6 -> 8" in err, err
    assert "batch.micro_batch 2 -> 1" in err and "LR schedule" in err and "from step 6 on" in err, err
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, 9)) and m[-1]["tokens"] == 8 * 4 * 16
    assert m[6]["config_changes"] == {"batch.micro_batch": [2, 1], "save_interval": [2, 4], "steps": [6, 8]}
    assert all("config_changes" not in r for r in m[:6] + m[7:])
    state = json.loads((run / "ckpt" / "step_8" / "trainer.json").read_text())
    assert state["config_changes"] == [{"step": 6, "changes": m[6]["config_changes"]}]


def test_resume_with_allowed_changes_counts_tokens_and_samples(tmp_path, capsys, data, reference):
    run = _copy(reference, tmp_path)
    code, err = _cli(capsys, _sets(data, run, "steps=8", "batch.global_batch=8", "allow_resume_changes=true"),
                     "--resume")
    assert code == 0 and "batch.global_batch 4 -> 8" in err and "reading on from sample 24" in err, err
    m = _metrics(run)
    assert [r["tokens"] for r in m[5:]] == [6 * 64, 6 * 64 + 128, 6 * 64 + 256]
    state = json.loads((run / "ckpt" / "step_8" / "trainer.json").read_text())
    assert state["samples"] == 6 * 4 + 2 * 8 and state["tokens"] == 6 * 64 + 2 * 128
    assert state["config_changes"][0]["changes"]["batch.global_batch"] == [4, 8]


def test_resume_applies_changed_optimizer_settings(tmp_path, data, reference):
    # Loading a checkpoint restores the AdamW hyperparameters it was saved with; the config's win.
    run = _copy(reference, tmp_path)
    r = setup(load_config(None, _sets(data, run, "optim.weight_decay=0.05", "optim.betas=[0.8, 0.9]")), True,
              Dist())
    assert r.step == 6 and r.samples == 24 and r.tokens == 6 * 64
    assert [(g["weight_decay"], g["betas"]) for g in r.optimizer.param_groups] == [(0.05, (0.8, 0.9)),
                                                                                   (0.0, (0.8, 0.9))]


# ---- 4. one trainer per run directory ------------------------------------------------------------


def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path, capsys, data, reference):
    run = _copy(reference, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    with lock_run_dir(run):  # as a trainer running in another process holds it
        code, err = _cli(capsys, _sets(data, run, "steps=8"), "--resume", "--allow-config-change")
        assert code == 2 and err.count("\n") == 1, err
        assert f"run directory {run.resolve()} is being written by another dropup process" in err, err
    assert (run / "metrics.jsonl").read_bytes() == before
    assert not list(tmp_path.glob(".*lock"))  # the lock file goes with its holder
    assert cli_main(_args(_sets(data, run, "steps=8"), "--resume", "--allow-config-change")) == 0


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, capsys, data):
    (tmp_path / "afile").write_text("keep me")
    code, err = _cli(capsys, _sets(data, tmp_path / "afile"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "exists and is not a directory; choose another out_dir" in err, err
    assert (tmp_path / "afile").read_text() == "keep me"


# ---- 5. every numeric setting checked where the config is read -------------------------------------


@pytest.mark.parametrize("bad, message", [
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
    ("optim.min_lr=-1e-5", "optim.min_lr must be >= 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must be >= 0 and < 1, got 1.0"),
    ("optim.betas=[-0.1, 0.9]", "optim.betas must be >= 0 and < 1, got -0.1"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be > 0, got -1.0"),
    ("optim.grad_clip=.inf", "optim.grad_clip must be a finite number"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("batch.micro_batch=0", "batch.micro_batch must be >= 1"),
    ("batch.global_batch=-4", "batch.global_batch must be >= 1"),
    ("data.seq_len=0", "data.seq_len must be >= 1, got 0"),
    ("data.eval_batches=-1", "data.eval_batches must be >= 0, got -1"),
    ("model.init_std=0", "model.init_std must be > 0"),
    ("model.vocab_size=0", "model.vocab_size must be >= 1"),
    ("seed=-1", "seed must be >= 0 and < 2^64, got -1"),
    ("steps=0", "steps must be >= 1, got 0"),
    ("loss.aux_loss_coef=-0.01", "loss.aux_loss_coef must be >= 0"),
    ("loss.z_loss_coef=.nan", "loss.z_loss_coef must be a finite number"),
    ("max_bad_steps=0", "max_bad_steps must be >= 1"),
    ("keep_last=0", "keep_last must be >= 1"),
    ("save_interval=-1", "save_interval must be >= 0"),
])  # fmt: skip
def test_numeric_settings_are_checked(tmp_path, capsys, data, bad, message):
    code, err = _cli(capsys, _sets(data, tmp_path / "run", bad))
    assert code == 2 and err.count("\n") == 1 and f"error: config: {message}" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("datasets, message", [
    ("[{path: P, weight: 0}]", "data.datasets[0].weight must be > 0, got 0.0"),
    ("[{path: P, weight: .nan}]", "data.datasets[0].weight must be a finite number"),
    ("[{path: P}, {path: P, weight: .inf, name: b}]", "data.datasets[1].weight must be a finite number"),
])  # fmt: skip
def test_dataset_weights_are_checked(tmp_path, capsys, data, datasets, message):
    sets = _sets(data, tmp_path / "run")
    sets[0] = "data.datasets=" + datasets.replace("P", str(data[0]))
    code, err = _cli(capsys, sets)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_tokens_budget_must_be_positive(tmp_path, capsys, data):
    code, err = _cli(capsys, _sets(data, tmp_path / "run", "steps=null", "tokens=0"))
    assert code == 2 and "config: tokens must be >= 1, got 0" in err, err


# ---- 7. a full disk while a checkpoint is written ------------------------------------------------


def _full_disk(monkeypatch, module, name: str, path_of, nth: int) -> None:
    """``module.name`` raises ENOSPC on its ``nth`` call for checkpoint step_4 (so the earlier
    calls of that save have written something)."""
    real, calls = getattr(module, name), {"n": 0}

    def write(*args, **kw):
        if ".step_4.tmp" in str(path_of(*args, **kw)):
            calls["n"] += 1
            if calls["n"] == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(module, name, write)


def _dcp_writer():
    import torch.distributed.checkpoint.filesystem as fs

    return fs


@pytest.mark.parametrize("module, name, path_of, nth", [
    (ckpt_module, "save_model", lambda model, path, **kw: path, 1),  # the Hugging Face export
    (_dcp_writer(), "_write_item", lambda transforms, stream, *a: stream.name, 3),  # model and optimizer state
    (ckpt_module, "write_manifest", lambda path: path, 1),  # the last file
])  # fmt: skip
def test_disk_full_while_writing_a_checkpoint(tmp_path, capsys, monkeypatch, data, reference, module, name,
                                              path_of, nth):
    run = tmp_path / "run"
    _full_disk(monkeypatch, module, name, path_of, nth)
    code, err = _cli(capsys, _sets(data, run))
    assert code == 2 and err.count("\n") == 1, err
    assert f"the disk filled up while writing checkpoint {run / 'ckpt' / 'step_4'}" in err, err
    assert f"the previous checkpoint {run / 'ckpt' / 'step_2'} is intact" in err and "--resume" in err, err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_2"]  # nothing of step_4 is left
    assert verify_checkpoint(run / "ckpt" / "step_2") == (True, None)
    monkeypatch.undo()
    assert cli_main(_args(_sets(data, run), "--resume")) == 0
    _same_metrics(_metrics(reference), _metrics(run))


def test_bad_run_dir_parent_is_one_line(tmp_path, data):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="cannot create"):
        train(load_config(None, _sets(data, tmp_path / "file" / "run")))


def test_resume_with_bf16_optimizer_states_is_exact(tmp_path, data):
    # The moments are loaded back as bf16 (load_state_dict alone would widen them to fp32, and
    # from the second step after the resume on, the losses would differ).
    sets = ["optim.state_dtype=bfloat16", "steps=5", "eval_interval=0"]
    ref = train(load_config(None, _sets(data, tmp_path / "ref", *sets)))
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for step in (4, 5):
        shutil.rmtree(run / "ckpt" / f"step_{step}")
    train(load_config(None, _sets(data, run, *sets)), resume=True)
    _same_metrics(_metrics(ref), _metrics(run))
