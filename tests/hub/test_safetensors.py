"""The safetensors writer: page-padded headers, direct and buffered writes alike, buffers placed
for direct I/O and reused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dropup.hub import safetensors as checkpoint
from dropup.hub.safetensors import ALIGN, ShardedWriter, TensorSpec, parse_size


def _write(out, specs_tensors, direct, max_shard="1GB", placed=()):
    """Write ``specs_tensors``; those named in ``placed`` go through the writer's own buffers."""
    specs = [TensorSpec(t.dtype, tuple(t.shape), name=n) for n, t in specs_tensors]
    out.mkdir()
    with ShardedWriter(out, specs, parse_size(max_shard), direct=direct) as w:
        for (n, t) in specs_tensors:
            w.write(n, w.buffer(n).copy_(t) if n in placed else t)
    return w


def test_direct_io_writes_the_same_bytes_as_buffered(tmp_path, monkeypatch):
    """Tensors of awkward sizes and placements: direct and buffered writes give identical files,
    headers end on a page, and (where the filesystem allows it) bulk data did go direct."""
    g = torch.Generator().manual_seed(0)
    tensors = []
    for i, (shape, dt) in enumerate([((3,), torch.float32), ((4096, 3), torch.bfloat16),
                                     ((7, 1031), torch.float32), ((5000,), torch.bfloat16),
                                     ((64, 512), torch.bfloat16), ((2, 4096), torch.float32)]):
        tensors.append((f"t{i}", torch.randn(shape, generator=g).to(dt)))
    direct_bytes = []
    real = checkpoint._pwrite_all
    monkeypatch.setattr(checkpoint, "_pwrite_all",
                        lambda fd, data, pos: (direct_bytes.append(len(data)) if fd in direct_fds
                                               else None, real(fd, data, pos)))
    direct_fds: set[int] = set()
    real_open = checkpoint._OutFile.__init__

    def spy_open(self, path, direct):
        real_open(self, path, direct)
        if self.dfd is not None:
            direct_fds.add(self.dfd)

    monkeypatch.setattr(checkpoint._OutFile, "__init__", spy_open)
    # t4 in a buffer the writer placed at its file offset's phase, as upcycle's experts are
    _write(tmp_path / "direct", tensors, direct=True, placed={"t4"})
    _write(tmp_path / "buffered", tensors, direct=False)
    for name in ("model.safetensors",):
        a = (tmp_path / "direct" / name).read_bytes()
        assert a == (tmp_path / "buffered" / name).read_bytes()
        header_len = int.from_bytes(a[:8], "little")
        assert (8 + header_len) % checkpoint.ALIGN == 0
    with safe_open(tmp_path / "direct" / "model.safetensors", "pt") as f:
        for n, t in tensors:
            assert torch.equal(f.get_tensor(n), t)
    if direct_fds:  # the filesystem took O_DIRECT: the aligned buffer must have gone that way
        assert sum(direct_bytes) >= 64 * 512 * 2 - checkpoint.ALIGN


def test_writer_places_buffers_and_reuses_them(tmp_path):
    """Buffers sit at their tensor's file phase; ``placed`` keeps a tensor that is placed and
    copies one that is not (or has another dtype); ``stage`` copies once, unpooled; a written
    buffer is handed out again for the next tensor of its size."""
    shapes = {"a": (3,), "b": (10, 3), "c": (10, 3), "d": (64, 64), "e": (64, 64)}
    specs = [TensorSpec(torch.bfloat16, s, name=n) for n, s in shapes.items()]
    offsets, pos = {}, 0
    for spec in specs:
        offsets[spec.name], pos = pos, pos + spec.nbytes
    with ShardedWriter(tmp_path, specs, 1 << 30) as w:
        bufs = {n: w.buffer(n) for n in shapes}
        for n, b in bufs.items():
            assert b.shape == shapes[n] and b.dtype == torch.bfloat16 and b.is_contiguous()
            assert b.data_ptr() % ALIGN == offsets[n] % ALIGN
        assert w.placed("d", bufs["d"]) is bufs["d"]
        assert w.placed("e", bufs["d"].float()).dtype == torch.bfloat16
        staged = w.stage("d", torch.ones(64, 64, dtype=torch.bfloat16)[:, :].clone())
        assert w.placed("e", staged) is staged and w.stage("e", staged) is staged
        assert w.stage("d", staged.float()).dtype == torch.float32  # converted on each write anyway
        for n in ("a", "b", "c"):
            w.write(n, bufs[n].fill_(1))
        w.write("d", bufs["d"].fill_(2))
        again = w.buffer("e")  # d's memory, back from the write
        assert again.untyped_storage().data_ptr() == bufs["d"].untyped_storage().data_ptr()
        w.write("e", staged)


def test_shards_and_index_follow_save_pretrained(tmp_path):
    """Greedy shards in plan order under save_pretrained's names, with its index format."""
    specs = [TensorSpec(torch.float32, (64,), name=f"t{i}") for i in range(5)]
    with ShardedWriter(tmp_path, specs, 600) as w:  # two 256-byte tensors per shard
        for s in specs:
            w.write(s.name, torch.full(s.shape, float(s.name[1:])))
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*files, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 5 * 256},
                     "weight_map": {"t0": files[0], "t1": files[0], "t2": files[1], "t3": files[1],
                                    "t4": files[2]}}
    with safe_open(tmp_path / files[2], "pt") as f:
        assert f.metadata() == {"format": "pt"} and torch.equal(f.get_tensor("t4"), torch.full((64,), 4.0))


def test_writer_refuses_what_the_plan_does_not_say(tmp_path):
    specs = [TensorSpec(torch.float32, (4,), name="a"), TensorSpec(torch.float32, (4,), name="b")]
    with pytest.raises(RuntimeError, match="plan says"):
        with ShardedWriter(tmp_path, specs, 1 << 20) as w:
            w.write("a", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="before b was written"):
        with ShardedWriter(tmp_path, specs, 1 << 20) as w:
            w.write("a", torch.zeros(4))
