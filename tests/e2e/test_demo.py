"""`dropup demo --tiny`: the whole pipeline, scaled down, within 90 CPU seconds."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from conftest import run_timed


@pytest.mark.slow
def test_tiny_demo_runs_and_reports_finite_numbers(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    r, cpu_seconds = run_timed([sys.executable, "-m", "dropup", "demo", "--tiny", "--out", str(out)], env=env,
                               capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert cpu_seconds <= 90, cpu_seconds
    for name in ("report.md", "loss.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    rows = results["val_loss"]
    assert list(rows) == ["dense", "naive start", "naive end", "drop-0.5 start", "drop-0.5 end"]
    assert set(rows["dense"]) == {"code", "prose", "c"}
    assert all(math.isfinite(v) for row in rows.values() for v in row.values())
    # Naive upcycling computes the dense function at step 0 (renormalised top-2 of equal experts).
    for d, v in rows["dense"].items():
        assert abs(rows["naive start"][d] - v) < 1e-4
    # The table printed and the one in the report hold the same finite numbers.
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "model" not in line]
    assert len(table) == 5
    numbers = [float(cell) for line in table for cell in line.strip("| ").split(" | ")[1:]]
    assert len(numbers) == 5 * 4 and all(math.isfinite(x) for x in numbers)
    assert table[0] in r.stdout
    # It ends with the routing analysis (Figure 5) of both trained MoEs, printed and in OUT/routing.
    routing = json.loads((out / "routing" / "routing.json").read_text())
    assert [m["name"] for m in routing["models"]] == ["moe-naive/step_20", "moe-drop-0.5/step_20"]
    assert routing["domains"] == ["code", "prose", "c"]
    assert (out / "routing" / "shares.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["routing"]["tokens"] == routing["tokens_per_domain"]
    assert "| moe-naive/step_20 | 8, 2 |" in r.stdout
    # Rerunning into the same directory replaces the earlier demo.
    assert (out / ".dropup-demo").exists()
