"""Loading a checkpoint into a model built on the meta device (``meta_model`` + ``load_into``): in one
process it gives ``load_model``'s parameters and buffers bit for bit; under FSDP2 over 2 gloo
processes each rank holds exactly its rows of every tensor and reads from the files no more than
those rows. Run as a script under torchrun, this file is the 2-process worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dropup.hub.safetensors import CheckpointReader
from dropup.model.decoder import selection_biases
from dropup.model.io import load_into, load_model, meta_model, write_router_bias

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints that take every branch of the loader: a dense llama stored in bf16 (a dtype
    conversion on load); a mixtral of 3 experts (2 processes split them 2 + 1) with selection biases
    and its safetensors in several shards; a qwen3_moe; a qwen2_moe whose [1, d] shared-expert gate
    leaves the second rank no rows; a granitemoe (experts stacked in the file, read as slices)."""
    from conftest import build_dense

    from dropup.convert.upcycle import upcycle

    root = tmp_path_factory.mktemp("meta")
    llama = build_dense(root / "llama", "llama", dtype=torch.bfloat16)
    out = {"llama": llama}
    upcycle(llama, root / "mixtral", num_experts=3, top_k=2, max_shard_size="20KB", progress=False)
    model = load_model(root / "mixtral", dtype=torch.float32)
    for i, b in enumerate(selection_biases(model)):
        b.copy_(torch.linspace(-0.1, 0.1, b.numel()) * (i + 1))
    write_router_bias(model, root / "mixtral")
    out["mixtral"] = root / "mixtral"
    upcycle(llama, root / "qwen3_moe", target="qwen3_moe", num_experts=4, progress=False)
    out["qwen3_moe"] = root / "qwen3_moe"
    upcycle(build_dense(root / "qwen2", "qwen2"), root / "qwen2_moe", num_experts=4, shared_expert="dense",
            progress=False)
    out["qwen2_moe"] = root / "qwen2_moe"
    upcycle(build_dense(root / "granite", "granite"), root / "granitemoe", num_experts=4, progress=False)
    out["granitemoe"] = root / "granitemoe"
    return out


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert list(ba) == list(bb)
    for name in ba:
        assert ba[name].dtype == bb[name].dtype and torch.equal(ba[name], bb[name]), name


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen3_moe", "granitemoe"])
def test_one_process_gives_load_models_parameters_bit_for_bit(checkpoints, arch):
    path = checkpoints[arch]
    ref = load_model(path, dtype=torch.float32)
    model = meta_model(path, dtype=torch.float32)
    assert all(p.is_meta for p in model.parameters())
    _same_model(load_into(model, path, "cpu"), ref)
    if arch == "mixtral":  # the biases came from the file, not zero
        assert all(b.abs().sum() > 0 for b in selection_biases(model))
    ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    # Another dtype is the same conversion as load_model's.
    _same_model(load_into(meta_model(path, dtype=torch.bfloat16), path, "cpu"), load_model(path, dtype=torch.bfloat16))


def test_trainer_starts_from_load_models_parameters_and_resumes_exactly(checkpoints, tmp_path):
    import shutil

    import yaml

    from dropup.data.tokens import write_dataset
    from dropup.train.config import load_config
    from dropup.train.loop import Dist, setup, train

    gen = torch.Generator().manual_seed(0)
    data = write_dataset(tmp_path / "data", {"train": [torch.randint(1, 90, (400,), generator=gen).tolist()]}, 96)

    def config(name: str, steps: int):
        cfg = {"model": {"init": str(checkpoints["mixtral"])}, "data": {"datasets": [{"path": str(data)}],
               "seq_len": 16}, "batch": {"global_batch": 4, "micro_batch": 2}, "steps": steps,
               "optim": {"lr": 1e-3, "warmup_steps": 1}, "save_interval": 2, "log_interval": 1, "progress": False,
               "out_dir": str(tmp_path / name)}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        return load_config(tmp_path / f"{name}.yaml")

    run = setup(config("setup", 1), False, Dist())
    _same_model(run.model, load_model(checkpoints["mixtral"], dtype=torch.float32))

    def metrics() -> list[dict]:
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    train(config("run", 4))
    whole = metrics()
    shutil.rmtree(tmp_path / "run" / "ckpt" / "step_4")
    train(config("run", 4), resume=True)
    assert len(whole) == 4 and metrics() == whole


@pytest.mark.slow  # about 20 s: two torchrun processes start torch and a gloo group
def test_two_gloo_processes_read_only_their_rows(checkpoints, tmp_path):
    """One torchrun launch for every checkpoint (its start-up is most of the time)."""
    paths = [str(checkpoints[a]) for a in ("llama", "mixtral", "qwen2_moe", "granitemoe")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(tmp_path), *paths]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for path in paths:
        total = ranks[0][path]["total"]
        held = [r[path]["held"] for r in ranks]
        read = [r[path]["read"] for r in ranks]
        assert sum(held) == total  # the shards tile every tensor
        assert read == held, (path, read, held)  # each rank read exactly its rows, nothing twice
        # About half each: the mixtral's 3 experts split 2 + 1, the rest evenly.
        assert all(0.3 * total < n < 0.7 * total for n in read), (path, read, total)
        assert all(r[path]["full_reads"] == 0 for r in ranks)
    assert ranks[1][paths[2]]["empty"] > 0  # qwen2_moe: rank 1 holds no row of the shared-expert gate


@pytest.mark.slow  # 15-30 s: each way loads in a fresh process that starts torch (the measurement needs it)
def test_load_memory_benchmark_smoke(tmp_path, capsys):
    """benchmarks/load_memory.py --smoke: a tiny checkpoint written and loaded both ways, each in a
    fresh process (two torch start-ups: most of the time), with the same parameters."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "load_memory.py"
    spec = importlib.util.spec_from_file_location("load_memory", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--no-results", "--device", "cpu", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| whole " in out and "| meta " in out
    assert "PASS: both loads give the same parameters and buffers" in out
    assert not list(tmp_path.iterdir())  # the written checkpoint is removed


def _worker(out_dir: Path, paths: list[str]) -> None:
    """Each checkpoint through the trainer's own ``make_model`` path (``meta_model``) and
    ``place_model`` (FSDP2 sharding, then ``load_into``), with every read of the files counted."""
    import torch.distributed as dist

    from dropup.train.loop import Dist, place_model

    dist.init_process_group("gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    counts = {"read": 0, "full_reads": 0}
    get, get_rows = CheckpointReader.get, CheckpointReader.get_rows

    def counted_get(self, name):
        counts["full_reads"] += 1
        return get(self, name)

    def counted_rows(self, name, start, stop):
        t = get_rows(self, name, start, stop)
        counts["read"] += t.numel()
        return t

    CheckpointReader.get, CheckpointReader.get_rows = counted_get, counted_rows
    result = {}
    for path in paths:
        counts.update(read=0, full_reads=0)
        model = place_model(meta_model(path, dtype=torch.float32), d, bf16=False, init=path)
        stats = dict(counts)
        CheckpointReader.get, CheckpointReader.get_rows = get, get_rows  # the reference reads all
        ref = load_model(path, dtype=torch.float32)
        CheckpointReader.get, CheckpointReader.get_rows = counted_get, counted_rows
        refs = dict(ref.named_parameters())
        held = empty = 0
        for name, p in model.named_parameters():
            local = p.to_local()
            rows = -(-p.shape[0] // d.world)
            start = min(d.rank * rows, p.shape[0])
            assert torch.equal(local, refs[name][start:start + local.shape[0]]), (path, name)
            assert torch.equal(p.full_tensor(), refs[name]), (path, name)
            held += local.numel()
            empty += local.numel() == 0
        for (name, a), b in zip(model.named_buffers(), ref.buffers()):
            assert torch.equal(a, b), (path, name)
        # The sharded model computes what the whole one does (FSDP2 all-gathers what was written).
        ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(model(ids), ref(ids), rtol=1e-5, atol=1e-6), path
        result[path] = {**stats, "held": held, "empty": empty, "total": sum(t.numel() for t in refs.values())}
    (out_dir / f"rank{d.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), sys.argv[2:])
