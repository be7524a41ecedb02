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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from dropup.errors import UserError

DOMAINS = ("code", "prose", "c")
MOE_RUNS = {"naive": dict(method="naive"), "drop-0.5": dict(method="drop", ratio=0.5)}


@dataclass
class DemoScale:
    corpus_mb: float  # text per domain
    vocab_size: int
    hidden: int
    d_f: int
    layers: int
    heads: int
    kv_heads: int
    seq_len: int
    global_batch: int
    micro_batch: int
    dense_steps: int
    moe_steps: int
    dense_lr: float
    moe_lr: float
    eval_interval: int
    eval_batches: int
    val_fraction: float = 0.05


FULL = DemoScale(corpus_mb=3.0, vocab_size=2048, hidden=128, d_f=512, layers=4, heads=4, kv_heads=2,
                 seq_len=128, global_batch=16, micro_batch=16, dense_steps=500, moe_steps=350,
                 dense_lr=3e-3, moe_lr=1e-3, eval_interval=25, eval_batches=4)
TINY = DemoScale(corpus_mb=0.15, vocab_size=384, hidden=32, d_f=64, layers=2, heads=2, kv_heads=1,
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


def _build_data(out: Path, s: DemoScale, seed: int) -> dict[str, Path]:
    from dropup.data.corpus import CorpusOptions, build_corpus, format_report
    from dropup.data.prepare import PrepareOptions, prepare, sample_documents, train_tokenizer
    from dropup.data.readers import InputFile, ReadOptions

    manifest = build_corpus(CorpusOptions(out=str(out / "corpus"), max_mb=s.corpus_mb, seed=seed))
    print(format_report(manifest))
    files = {d: out / "corpus" / f"{d}.jsonl" for d in DOMAINS if manifest["domains"][d]["docs"]}
    # One tokenizer for every domain, trained on an equal-size sample of each.
    sample = sample_documents([InputFile(p, "jsonl") for p in files.values()], ReadOptions(),
                              int(s.corpus_mb * 1e6), seed)
    train_tokenizer(sample, s.vocab_size, out / "tokenizer")
    data = {}
    for d, path in files.items():
        meta = prepare(PrepareOptions(inputs=[str(path)], out=str(out / "data" / d), tokenizer=str(out / "tokenizer"),
                                      domain=d, val_fraction=s.val_fraction, seed=seed, progress=False))
        sp = meta["splits"]
        print(f"{d:>6}: train {sp['train']['tokens']:,} tokens, val {sp.get('val', {}).get('tokens', 0):,} tokens")
        data[d] = out / "data" / d
    return data


def _dense_init(path: Path, s: DemoScale, vocab: int, seed: int) -> Path:
    from dropup.hub.config import ModelConfig
    from dropup.model.io import save_model
    from dropup.model.decoder import build_model
    from dropup.train.config import PRESETS

    hf = {**PRESETS["dense-tiny"], "hidden_size": s.hidden, "intermediate_size": s.d_f,
          "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
          "vocab_size": vocab, "max_position_embeddings": s.seq_len}
    torch.manual_seed(seed)
    save_model(build_model(ModelConfig.from_hf(hf), device="cpu", dtype=torch.float32, std=0.02), path)
    return path


def _train(run_dir: Path, init: Path, data: dict[str, Path], s: DemoScale, steps: int, lr: float, seed: int,
           save_interval: int = 0, keep_last: int = 1, device: str = "cpu") -> Path:
    """Train from ``init`` on the equal-weight mixture; returns the final Hugging Face checkpoint.
    ``save_interval``/``keep_last`` keep intermediate checkpoints (``dropup repro``'s curves)."""
    from dropup.train.loop import train
    from dropup.train.config import load_config

    cfg = {"model": {"init": str(init)},
           "data": {"datasets": [{"path": str(p), "weight": 1.0, "name": d} for d, p in data.items()],
                    "seq_len": s.seq_len, "eval_batches": s.eval_batches},
           "batch": {"global_batch": s.global_batch, "micro_batch": s.micro_batch},
           "steps": steps, "optim": {"lr": lr, "warmup_steps": max(1, steps // 10)},
           "seed": seed, "log_interval": max(1, s.eval_interval // 5), "eval_interval": s.eval_interval,
           "save_interval": save_interval, "keep_last": keep_last, "out_dir": str(run_dir), "device": device}
    cfg_path = run_dir.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    train(load_config(cfg_path))
    return run_dir / "ckpt" / f"step_{steps}" / "model"


@torch.no_grad()
def evaluate(model_dir: Path, data: dict[str, Path], s: DemoScale) -> dict[str, float]:
    """Mean next-token loss on the first ``eval_batches`` validation batches of each domain: the
    batches ``dropup train`` evaluates on, so the numbers line up with its curves."""
    from dropup.data.tokens import TokenFile, validation_batches
    from dropup.model.io import load_model

    model = load_model(model_dir, device="cpu", dtype=torch.float32).eval()
    out = {}
    for d, path in data.items():
        batches = validation_batches(TokenFile(path, "val"), s.seq_len, s.micro_batch, s.eval_batches)
        out[d] = sum(float(model(b[:, :-1], targets=b[:, 1:])) for b in batches) / len(batches)
    return out


def _routing(out: Path, data: dict[str, Path], s: DemoScale) -> dict:
    """The paper's Figure 5 analysis of both trained MoEs, on as many validation tokens per domain
    as the smallest domain has (at most the analysis's default)."""
    from dropup.analysis.specialisation import RoutingOptions, analyze_routing, comparison_table
    from dropup.data.tokens import TokenFile

    tokens = min(200_000, *(len(TokenFile(p, "val").tokens) for p in data.values()))
    result = analyze_routing(RoutingOptions([str(out / f"moe-{n}") for n in MOE_RUNS], [str(p) for p in data.values()],
                                            str(out / "routing"), tokens=tokens, seq_len=s.seq_len,
                                            batch_size=s.micro_batch, device="cpu", overwrite=True))
    return {"tokens": tokens, "mean_jsd": {m["name"]: m["mean_jsd"] for m in result["models"]},
            "dead_experts": {m["name"]: m["dead_total"] for m in result["models"]},
            "table": comparison_table(result)}


def run_demo(out: str | Path, tiny: bool = False, seed: int = 0) -> dict:
    from dropup.analysis.report import write_report
    from dropup.convert.upcycle import upcycle

    torch.set_num_threads(max(1, torch.get_num_threads()))
    s = TINY if tiny else FULL
    out = Path(out)
    _prepare_out(out)
    clock = _Clock()
    with clock.stage("corpus, tokenizer and datasets"):
        data = _build_data(out, s, seed)
    vocab = json.loads((data[next(iter(data))] / "meta.json").read_text())["vocab_size"]
    with clock.stage("dense pretraining"):
        dense = _train(out / "dense", _dense_init(out / "dense-init", s, vocab, seed), data, s,
                       s.dense_steps, s.dense_lr, seed)
    evals = {"dense": evaluate(dense, data, s)}
    for name, opts in MOE_RUNS.items():
        with clock.stage(f"upcycle {name} and train"):
            init = out / f"moe-{name}-init"
            upcycle(dense, init, num_experts=8, top_k=2, seed=seed, progress=False, **opts)
            evals[f"{name} start"] = evaluate(init, data, s)
            final = _train(out / f"moe-{name}", init, data, s, s.moe_steps, s.moe_lr, seed)
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
        results["routing"] = _routing(out, data, s)
    results["stage_seconds"], results["total_seconds"] = clock.stages, clock.total
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(results["table"])
    print(f"\nrouting of the trained MoEs on {results['routing']['tokens']:,} validation tokens per domain "
          f"({out / 'routing'}; README: Evaluate and analyse)")
    print(results["routing"]["table"])
    print(f"\nwrote {out / 'report.md'}, {out / 'loss.png'} and {out / 'routing'} ({clock.total:.0f} s in all)")
    return results
