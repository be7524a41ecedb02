"""Peak memory of a conversion does not grow with the model: a checkpoint 20x larger than a fixed
budget converts within that budget (measured as growth of the process's peak RSS)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dropup.hub.synthetic import llama_config, write_synthetic_dense

PROBE = textwrap.dedent("""
    import resource, sys
    from dropup import upcycle
    small, big, root = sys.argv[1:4]
    upcycle(small, root + "/out_warm", progress=False)  # imports, thread pool, allocator warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prov = upcycle(big, root + "/out_big", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - base, prov["output_bytes"])
""")


@pytest.mark.slow
def test_peak_rss_stays_under_budget_for_20x_larger_checkpoint(tmp_path):
    shape = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=4096)
    write_synthetic_dense(tmp_path / "small", llama_config(num_hidden_layers=1, **shape))
    write_synthetic_dense(tmp_path / "big", llama_config(num_hidden_layers=16, **shape))
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "small"), str(tmp_path / "big"),
                        str(tmp_path)], capture_output=True, text=True, env=dict(os.environ),
                       check=True)
    growth, output = map(int, r.stdout.split())
    budget = 42 * 10**6
    assert output >= 20 * budget
    assert growth <= budget, f"peak RSS grew by {growth / 1e6:.1f} MB converting {output / 1e9:.2f} GB"


def _write(out, specs_tensors, direct, max_shard="1GB"):
    from dropup.hub.safetensors import ShardedWriter, TensorSpec, parse_size

    specs = [TensorSpec(t.dtype, tuple(t.shape), name=n) for n, t in specs_tensors]
    out.mkdir()
    w = ShardedWriter(out, specs, parse_size(max_shard), direct=direct)
    for (n, t) in specs_tensors:
        w.write(n, t)
    w.close()
    return w


def test_direct_io_writes_the_same_bytes_as_buffered(tmp_path, monkeypatch):
    """Tensors of awkward sizes and placements: direct and buffered writes give identical files,
    headers end on a page, and (where the filesystem allows it) bulk data did go direct."""
    import torch
    from safetensors import safe_open

    from dropup.hub import safetensors as checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = []
    for i, (shape, dt) in enumerate([((3,), torch.float32), ((4096, 3), torch.bfloat16),
                                     ((7, 1031), torch.float32), ((5000,), torch.bfloat16),
                                     ((64, 512), torch.bfloat16), ((2, 4096), torch.float32)]):
        t = torch.randn(shape, generator=g).to(dt)
        if i == 4:  # a buffer placed at its file offset's phase, as upcycle's pool does
            offset = sum(x.numel() * x.element_size() for _, x in tensors)
            t = checkpoint.aligned_empty(shape, dt, phase=offset % checkpoint.ALIGN).copy_(t)
        tensors.append((f"t{i}", t))
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
    _write(tmp_path / "direct", tensors, direct=True)
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


def test_buffer_placement():
    import torch

    from dropup.hub import safetensors as checkpoint

    for phase in (0, 2, 4094, 512):
        t = checkpoint.aligned_empty((10, 3), torch.bfloat16, phase)
        assert t.data_ptr() % checkpoint.ALIGN == phase and t.is_contiguous()
