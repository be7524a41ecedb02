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
