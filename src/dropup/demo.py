"""`make demo`: the paper's story end to end on a CPU, on text harvested from this machine.

1. corpus: ``code``, ``prose`` and ``c`` text from the installed Python and system headers;
2. a byte-level BPE tokenizer trained on a sample of all three, then one dataset per domain;
3. a small dense Llama pretrained on the equal-weight mixture;
4. the dense model upcycled to 8 experts top-2, naively and by Drop-Upcycling (r = 0.5);
5. both MoE models trained for the same tokens in the same data order (same seed);
6. validation loss per domain of the dense model and of each MoE at its start and end;
7. ``report.md``, ``loss.png`` (training and validation curves) and ``results.json`` in OUT.

Whatever the numbers say, they are reported as measured. ``--tiny`` is the same pipeline scaled
down for the test suite.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dropup.errors import UserError
from dropup.pipeline import Scale, build_data, dense_init, evaluate_models, fit_eval, routing_summary, train_run

MOE_RUNS = {"naive": dict(method="naive"), "drop-0.5": dict(method="drop", ratio=0.5)}


FULL = Scale(corpus_mb=3.0, vocab_size=2048, hidden=128, d_f=512, layers=4, heads=4, kv_heads=2,
                 seq_len=128, global_batch=16, micro_batch=16, dense_steps=500, moe_steps=350,
                 dense_lr=3e-3, moe_lr=1e-3, eval_interval=25, eval_batches=4)
TINY = Scale(corpus_mb=0.15, vocab_size=384, hidden=32, d_f=64, layers=2, heads=2, kv_heads=1,
                 seq_len=32, global_batch=8, micro_batch=8, dense_steps=30, moe_steps=20,
                 dense_lr=3e-3, moe_lr=1e-3, eval_interval=10, eval_batches=2)


class _Clock:
    def __init__(self):
        self.stages: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                print(f"== {name}", flush=True)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.stages[name] = time.perf_counter() - self.t

        return _Stage()

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


def _prepare_out(out: Path) -> None:
    """OUT is created, or replaced when it holds an earlier demo (never a directory of other files)."""
    if out.exists() and any(out.iterdir()):
        earlier = [out / ".dropup-demo", out / "results.json", out / "naive" / "upcycling.json"]  # the last: dropup <= 0.1's demo
        if not any(p.exists() for p in earlier):
            raise UserError(f"{out} is not empty and holds no earlier demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".dropup-demo").touch()


def evaluate(model_dir: Path, data: dict[str, Path], s: Scale) -> dict[str, float]:
    """Validation loss per domain on the windows ``dropup train`` evaluates on (so the numbers
    line up with its curves)."""
    return evaluate_models([model_dir], data, s)[0]["loss"]


def run_demo(out: str | Path, tiny: bool = False, seed: int = 0) -> dict:
    from dropup.analysis.report import write_report
    from dropup.convert.upcycle import upcycle

    torch.set_num_threads(max(1, torch.get_num_threads()))
    s = TINY if tiny else FULL
    out = Path(out)
    _prepare_out(out)
    clock = _Clock()
    with clock.stage("corpus, tokenizer and datasets"):
        data = build_data(out, s, seed)
        s = fit_eval(s, data)
    vocab = json.loads((data[next(iter(data))] / "meta.json").read_text())["vocab_size"]
    with clock.stage("dense pretraining"):
        dense = train_run(out / "dense", dense_init(out / "dense-init", s, vocab, seed), data, s,
                       s.dense_steps, s.dense_lr, seed)
    evals = {"dense": evaluate(dense, data, s)}
    for name, opts in MOE_RUNS.items():
        with clock.stage(f"upcycle {name} and train"):
            init = out / f"moe-{name}-init"
            upcycle(dense, init, num_experts=8, top_k=2, seed=seed, progress=False, **opts)
            evals[f"{name} start"] = evaluate(init, data, s)
            final = train_run(out / f"moe-{name}", init, data, s, s.moe_steps, s.moe_lr, seed)
            evals[f"{name} end"] = evaluate(final, data, s)
    results = {"scale": "tiny" if tiny else "full", "config": asdict(s), "seed": seed, "val_loss": evals,
               "tokens": {"dense": s.dense_steps * s.global_batch * s.seq_len,
                          "moe": s.moe_steps * s.global_batch * s.seq_len},
               "stage_seconds": clock.stages, "total_seconds": clock.total,
               "torch_threads": torch.get_num_threads()}
    for name, v in evals.items():
        if not all(math.isfinite(x) for x in v.values()):
            print(f"warning: non-finite validation loss for {name}: {v}")
    results["table"] = write_report(out, results, {n: out / f"moe-{n}" for n in MOE_RUNS}, out / "dense")
    with clock.stage("routing analysis"):
        results["routing"] = routing_summary({n: out / f"moe-{n}" for n in MOE_RUNS}, data, s, out / "routing")
    results["stage_seconds"], results["total_seconds"] = clock.stages, clock.total
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(results["table"])
    print(f"\nrouting of the trained MoEs on {results['routing']['tokens']:,} validation tokens per domain "
          f"({out / 'routing'}; README: Evaluate and analyse)")
    print(results["routing"]["table"])
    print(f"\nwrote {out / 'report.md'}, {out / 'loss.png'} and {out / 'routing'} ({clock.total:.0f} s in all)")
    return results
