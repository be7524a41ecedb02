"""The `dropup` command line: a thin layer over the library functions.

Bad input raises ``UserError`` anywhere below; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from dropup.errors import UserError
from dropup.options import choices


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other bad input.

    argparse's own error prints the whole usage block first, which buries the one line that
    says what is wrong; ``--help`` still prints it.
    """

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _upcycle_parser(sub) -> None:
    from dropup.convert.upcycle import UpcycleOptions

    d = UpcycleOptions()
    p = sub.add_parser("upcycle", help="build an MoE checkpoint from a dense one",
                       description="Build a Hugging Face MoE checkpoint from a dense Llama-family "
                       "checkpoint by one of the Drop-Upcycling paper's construction methods.")
    p.add_argument("src", help="dense Hugging Face checkpoint directory, or a .gguf file "
                   "(dequantised first; needs the gguf extra); or an MoE checkpoint to expand "
                   "(--num-experts a multiple of its experts)")
    p.add_argument("out", help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--method", default=d.method, choices=choices(UpcycleOptions, "method"),
                   help="construction method (default: %(default)s; see README)")
    p.add_argument("--ratio", default=d.ratio, metavar="R",
                   help="fraction r of each expert's neurons re-initialised (drop) or perturbed (noise): "
                   "one value (default %(default)s), one per layer (0.2,0.4,...), or linear:A:B over depth")
    p.add_argument("--num-experts", type=int, default=d.num_experts,
                   help="experts E per MoE layer (default 8, the paper's)")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help="experts each token is routed to, weights renormalised (default 2; when SRC is an "
                   "MoE being expanded, its k times the expansion factor, which keeps its function)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="every random draw (index sets, new values, routers) derives from it")
    p.add_argument("--index-sampling", default=d.index_sampling,
                   choices=choices(UpcycleOptions, "index_sampling"),
                   help="shared: one neuron set per expert for gate, up and down (the paper); "
                   "per-matrix: an independent set per matrix (the authors' released script)")
    p.add_argument("--reinit-stats", default=d.reinit_stats, choices=choices(UpcycleOptions, "reinit_stats"),
                   help="mean/std of the replaced slice (default) or of the whole dense matrix")
    p.add_argument("--reinit-scale", type=float, default=d.reinit_scale, metavar="S",
                   help="drop: draw the new values with S times the dense weights' std (default 1)")
    p.add_argument("--reinit-down", default=d.reinit_down, choices=choices(UpcycleOptions, "reinit_down"),
                   help="drop: the re-drawn neurons' down-projection columns drawn (default) or zeros "
                   "(those neurons start silent)")
    p.add_argument("--noise-std", type=float, default=d.noise_std, help="std of the noise method")
    p.add_argument("--router-init", default=d.router_init, choices=choices(UpcycleOptions, "router_init"),
                   help="the new routers: zero-mean uniform (the authors' choice), normal, or zeros")
    p.add_argument("--router-std", type=float, default=d.router_std,
                   help="standard deviation of the router init (default 0.02)")
    p.add_argument("--init-std", type=float, default=d.init_std, help="std of the scratch method")
    p.add_argument("--sources", nargs="+", default=[], metavar="SRC_N",
                   help="btx: dense models of SRC's shape, trained further from it (directories or .gguf files)")
    p.add_argument("--target", default=d.target, choices=choices(UpcycleOptions, "target"),
                   help="the MoE architecture written (auto: mixtral for llama/mistral, qwen2_moe, qwen3_moe)")
    p.add_argument("--moe-layers", default=d.moe_layers, metavar="SPEC",
                   help="only these layers become MoE, the others keep the dense FFN: indices (1,3) or "
                   "every:N (layers N-1, 2N-1, ...; Qwen-MoE's decoder_sparse_step); qwen2_moe, qwen3_moe")
    p.add_argument("--granularity", type=int, default=d.granularity, metavar="G",
                   help="fine-grained experts: each dense FFN cut into G shards of d_f / G neurons; "
                   "E and --top-k multiples of G (default 1: whole-width experts)")
    p.add_argument("--shared-expert", default=d.shared_expert, choices=choices(UpcycleOptions, "shared_expert"),
                   help="qwen2_moe: how the shared expert starts: silent (default), dense (a copy of "
                   "the dense FFN, routed experts silent) or shard (shard 0 of G)")
    p.add_argument("--shared-expert-size", type=int, default=d.shared_expert_size, metavar="N",
                   help="qwen2_moe: the shared expert's intermediate width (default: d_f, or d_f / G for shard)")
    p.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef,
                   help="router_aux_loss_coef in config.json (default 0.02, the paper's)")
    p.add_argument("--dtype", default=d.dtype, choices=choices(UpcycleOptions, "dtype"),
                   help="dtype of the written tensors (auto: the source's)")
    p.add_argument("--max-shard-size", default=d.max_shard_size,
                   help="largest safetensors shard, e.g. 5GB (default) or 500MB")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT (only once the new one is complete)")
    p.add_argument("--verify", action="store_true",
                   help="run the result in transformers layer by layer against SRC: every tensor must be "
                   "read; report the max logit difference and the loss change (naive and r = 0 must match)")
    p.add_argument("--verify-text", default=d.verify_text, metavar="FILE",
                   help="compare on this text, tokenised by SRC's tokenizer, instead of random tokens "
                   "(implies --verify)")
    p.add_argument("--threads", type=int, default=d.threads, help="worker threads (default: one per core, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _run_upcycle(a: argparse.Namespace) -> int:
    from dropup.convert.upcycle import UpcycleOptions, upcycle

    opts = {k: v for k, v in vars(a).items() if k not in ("command", "src", "out", "quiet")}
    prov = upcycle(a.src, a.out, UpcycleOptions(**opts, progress=not a.quiet))
    if not a.quiet:
        print(f"wrote {a.out}: {prov['target']}, {a.num_experts} experts top-{prov['options']['top_k']}, "
              f"method {a.method}, {prov['output_bytes'] / 1e9:.3f} GB in {prov['seconds']:.1f} s")
        if "verify" in prov:
            from dropup.convert.verify import summary

            print(summary(prov["verify"]))
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="a few tokens from a checkpoint (through transformers)",
                       description="Continue a prompt with a Hugging Face checkpoint (an upcycled MoE, a "
                       "training export, any causal LM), to see that it still produces text.")
    p.add_argument("path", help="a Hugging Face checkpoint directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled draws")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory when the checkpoint has none (default: the checkpoint's)")


def _run_generate(a: argparse.Namespace) -> int:
    from dropup.model.generate import generate

    print(generate(a.path, a.prompt, max_new_tokens=a.max_new_tokens, sample=a.sample,
                   temperature=a.temperature, top_p=a.top_p, seed=a.seed, tokenizer=a.tokenizer))
    return 0


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe an MoE checkpoint and how alike its experts are")
    p.add_argument("path", help="a Hugging Face MoE checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-similarity", action="store_true", help="skip the per-layer expert comparison")


def _run_inspect(a: argparse.Namespace) -> int:
    from dropup.analysis.experts import format_report, inspect_checkpoint

    report = inspect_checkpoint(a.path, similarity=not a.no_similarity)
    print(json.dumps(report, indent=1) if a.json else format_report(report))
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on built-in data (see README)")
    p.add_argument("--out", default="runs/demo", help="directory for the demo's data, models and report")
    p.add_argument("--tiny", action="store_true", help="a scaled-down run for the test suite")


def _run_demo(a: argparse.Namespace) -> int:
    from dropup.demo import run_demo

    run_demo(a.out, tiny=a.tiny)
    return 0


def _repro_parser(sub) -> None:
    p = sub.add_parser("repro", help="the paper's claims C1-C8 measured end to end (issue 14)")
    p.add_argument("--preset", default="cpu-tiny", help="a name from the presets table in src/dropup/repro.py (an unknown name lists them)")
    p.add_argument("--out", required=True, help="directory for the study's phases, models and report.md")
    p.add_argument("--resume", action="store_true", help="continue a study in OUT, skipping finished phases")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set moe_steps=100 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="the study's seed (the second seed is SEED + 1)")
    p.add_argument("--seed-model", metavar="PATH", help="start every MoE from this dense Hugging Face "
                   "checkpoint (and tokenize with its tokenizer) instead of a dense seed trained here")
    p.add_argument("--data", nargs="+", default=[], metavar="DATASET", help="with --seed-model: datasets written "
                   "by `dropup data prepare` with its tokenizer, one per domain, instead of the harvested corpus")


def _run_repro(a: argparse.Namespace) -> int:
    import shlex
    import sys

    from dropup.repro import run_repro

    run_repro(a.out, a.preset, resume=a.resume, sets=a.sets, seed=a.seed, seed_model=a.seed_model, datasets=a.data,
              command=shlex.join(["dropup", *sys.argv[1:]]))
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a dense or MoE model (the paper's recipe)",
                       description="Train from a Hugging Face checkpoint or a preset shape on prepared "
                       "token datasets; run under torchrun for several GPUs (FSDP2).")
    p.add_argument("--config", required=True, help="YAML run config (see README, Training)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in out_dir (start fresh if there is none)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept settings that differ from the checkpoint's (steps, lr, "
                   "seed, batch, ...; the change is recorded), same as allow_resume_changes: true")


def _run_train(a: argparse.Namespace) -> int:
    from dropup.train.loop import train
    from dropup.train.config import load_config

    sets = [*a.set, *(["allow_resume_changes=true"] if a.allow_config_change else [])]
    train(load_config(a.config, sets), resume=a.resume)
    return 0


def _data_parser(sub) -> None:
    from dropup.data.prepare import PrepareOptions

    d = PrepareOptions(inputs=[], out="")
    p = sub.add_parser("data", help="prepare token datasets; build the built-in corpus",
                       description="Tokenise text into the trainer's token files, or harvest the "
                       "built-in multi-domain corpus from this machine.")
    # The metavar is argparse's own rendering of the choices: --help is unchanged, and a missing
    # command is reported by its choices rather than by the name of its attribute.
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,corpus}")
    q = dsub.add_parser("prepare", help="tokenise text files into a dataset directory",
                        description="Tokenise .txt/.md, .jsonl/.json (also .gz/.zst), Parquet and "
                        "datasets.save_to_disk inputs, or directories of them, into token files.")
    q.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    q.add_argument("--out", required=True, help="output dataset directory (new or empty)")
    q.add_argument("--tokenizer", default=d.tokenizer,
                   help="a Hugging Face tokenizer directory, or 'train' (byte-level BPE, the default)")
    q.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocabulary of a trained tokenizer")
    q.add_argument("--tokenizer-sample-mb", type=float, default=d.tokenizer_sample_mb,
                   help="text sampled (seeded) to train the tokenizer on")
    q.add_argument("--text-key", default=d.text_key, help="JSON field / Parquet column holding the text")
    q.add_argument("--eos-token", default=d.eos_token, metavar="TOKEN",
                   help="token appended to every document (default: the tokenizer's end-of-text token; "
                   "an instruct tokenizer's chat separator such as <|im_end|> only if it has no other)")
    q.add_argument("--glob", action="append", default=[], dest="globs", metavar="PATTERN",
                   help="in directories, read only files matching PATTERN (repeatable), e.g. '*.jsonl.zst'")
    q.add_argument("--doc-split", default=d.doc_split, choices=choices(PrepareOptions, "doc_split"),
                   help=".txt/.md documents: a whole file (default), blank-line paragraphs, or lines")
    q.add_argument("--domain", default=d.domain, help="domain label stored in meta.json")
    q.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of documents for the val split (seeded, by document)")
    q.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the train/val split and the tokenizer's text sample")
    q.add_argument("--dtype", default=d.dtype, choices=choices(PrepareOptions, "dtype"),
                   help="of the token files (default: the smallest that holds the vocabulary)")
    q.add_argument("--skip-bad", action="store_true", help="skip and count bad JSON lines/records")
    q.add_argument("--strict-utf8", action="store_true",
                   help="fail on bytes that are not UTF-8 (default: replace with U+FFFD and count)")
    q.add_argument("--batch-mb", type=float, default=d.batch_mb, help="text per tokenizer batch")
    q.add_argument("--threads", type=int, default=d.threads, help="tokenizer worker processes (default: one per core)")
    q.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    from dropup.data.corpus import CorpusOptions

    c = CorpusOptions(out="")
    r = dsub.add_parser("corpus", help="harvest the built-in domain-labelled corpus from this machine",
                        description="Collect code, prose and C text from what is installed (no "
                        "download): one JSONL file per domain, deduplicated, with a manifest.")
    r.add_argument("--out", required=True, help="output directory (new or empty)")
    r.add_argument("--max-mb", type=float, default=c.max_mb, help="size cap per domain (MB of text)")
    r.add_argument("--domains", nargs="+", default=list(c.domains), help="domains to collect")
    r.add_argument("--seed", type=int, default=c.seed, help="seeds the file order used under the cap")
    r.add_argument("--quiet", action="store_true", help="no summary")


def _run_data(a: argparse.Namespace) -> int:
    import time

    if a.data_command == "corpus":
        from dropup.data.corpus import CorpusOptions, build_corpus, format_report

        manifest = build_corpus(CorpusOptions(out=a.out, max_mb=a.max_mb, domains=tuple(a.domains),
                                              seed=a.seed))
        if not a.quiet:
            print(format_report(manifest))
        return 0
    from dropup.data.prepare import PrepareOptions, prepare, summary_line, warnings_of

    opts = {k: v for k, v in vars(a).items() if k not in ("command", "data_command", "quiet")}
    t0 = time.perf_counter()
    meta = prepare(PrepareOptions(**opts, progress=not a.quiet))
    for w in warnings_of(meta):
        print(f"dropup data prepare: warning: {w}", file=sys.stderr)
    if not a.quiet:
        print(summary_line(meta, a.out, time.perf_counter() - t0))
    return 0


def _model_run_args(p: argparse.ArgumentParser, defaults) -> None:
    """How eval and analyze routing run models over datasets (fields of their options classes)."""
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default=defaults.device, choices=choices(type(defaults), "device"),
                   help="where the models run (auto: CUDA when available, else the CPU)")
    p.add_argument("--dtype", default=defaults.dtype, choices=choices(type(defaults), "dtype"),
                   help="the weights' dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="use datasets tokenised with another tokenizer than the checkpoint's")


def _eval_parser(sub) -> None:
    from dropup.analysis.evaluate import EvalOptions

    d = EvalOptions(checkpoints=[], datasets=[])
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of checkpoints on datasets",
                       description="Score checkpoints (or every checkpoint of a training run) on prepared "
                       "datasets: every token of the split once, in non-overlapping windows.")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="Hugging Face checkpoint directories, or a training run directory (its checkpoints "
                   "in step order: a curve)")
    p.add_argument("--data", nargs="+", default=[], dest="datasets", metavar="DATASET",
                   help="dataset directories written by `dropup data prepare`")
    p.add_argument("--split", default=d.split, help="the split scored (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=d.tokens, metavar="N",
                   help="read the first N tokens of each dataset's split (default: all of it)")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="window length (default: the model's max_position_embeddings, at most 4096)")
    _model_run_args(p, d)
    p.add_argument("--json", action="store_true", help="print eval.json's contents instead of the table")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write eval.json there (and loss.png for a run's curve); DIR must be new or empty")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    h = p.add_argument_group("lm-evaluation-harness (the optional extra dropup[eval])")
    h.add_argument("--lm-eval", metavar="TASKS", default=None,
                   help="run these lm-eval tasks (comma-separated names, groups or globs) on each CKPT "
                   "instead of dropup's own scoring, and print lm-eval's table")
    h.add_argument("--lm-eval-include", metavar="DIR", default=None,
                   help="a directory of extra task YAMLs (e.g. one --write-lm-eval-tasks wrote)")
    h.add_argument("--lm-eval-limit", type=int, default=None, metavar="N", help="at most N documents per task")
    h.add_argument("--write-lm-eval-tasks", metavar="DIR", default=None,
                   help="write a task per --data dataset into DIR (its split's documents as local JSON lines: "
                   "rolling log-likelihood, bits per byte), for `lm_eval --include_path DIR`")


_LM_EVAL_KEYS = ("lm_eval", "lm_eval_include", "lm_eval_limit", "write_lm_eval_tasks")


def _run_eval(a: argparse.Namespace) -> int:
    from dropup.analysis.evaluate import EvalOptions, evaluate, format_table, report_json

    if a.write_lm_eval_tasks or a.lm_eval:
        return _run_lm_eval(a)
    opts = {k: v for k, v in vars(a).items() if k not in ("command", "json", "quiet", *_LM_EVAL_KEYS)}
    report = evaluate(EvalOptions(**opts, progress=not a.quiet))
    print(report_json(report) if a.json else format_table(report))
    return 0


def _run_lm_eval(a: argparse.Namespace) -> int:
    from dropup.analysis import harness
    from dropup.hub.atomic import atomic_dir, atomic_write_text
    from dropup.model.io import runtime

    if not a.lm_eval and a.checkpoints:
        raise UserError("--write-lm-eval-tasks writes task files only; to also score CKPT on them, add "
                        "--lm-eval dropup")
    if a.lm_eval and not a.checkpoints:
        raise UserError("--lm-eval needs a checkpoint to run on: dropup eval CKPT --lm-eval TASKS")
    if a.write_lm_eval_tasks:
        tasks = harness.write_tasks(a.write_lm_eval_tasks, a.datasets, split=a.split)
        if not a.quiet:
            print(f"wrote {len(tasks)} lm-eval tasks into {a.write_lm_eval_tasks}: {', '.join(tasks)} "
                  f"(group dropup); run them with --lm-eval dropup --lm-eval-include {a.write_lm_eval_tasks}")
    if not a.lm_eval:
        return 0
    include = a.lm_eval_include or a.write_lm_eval_tasks
    device, dtype = runtime(a.device, a.dtype)
    runs = {}
    for ckpt in a.checkpoints:
        results = harness.run_lm_eval(ckpt, a.lm_eval, include_path=include, device=device.type,
                                      dtype=str(dtype).removeprefix("torch."),
                                      batch_size=a.batch_size, limit=a.lm_eval_limit)
        runs[ckpt] = results
        print(f"{ckpt}:\n{harness.format_table(results)}")
    if a.out:
        with atomic_dir(a.out, label="--out", advice="choose a new directory or remove it") as tmp:
            for i, (ckpt, results) in enumerate(runs.items()):
                atomic_write_text(tmp / (f"lm_eval_{i}.json" if len(runs) > 1 else "lm_eval.json"),
                                  harness.to_json({"checkpoint": ckpt, **results}))
    return 0


def _routing_parser(asub) -> None:
    from dropup.analysis.specialisation import RoutingOptions

    d = RoutingOptions(checkpoints=[], data=[], out="")
    p = asub.add_parser("routing", help="how the routers divide domains among experts (the paper's Figure 5)",
                        description="Run MoE checkpoints over a fixed token sample per domain and record, "
                        "per layer, expert shares per domain, cross-domain JSD, dead experts, load "
                        "imbalance, co-activation, repetition and vocabulary specialisation; writes "
                        "routing.json, report.md and PNG figures into OUT.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="Hugging Face MoE checkpoint directories, or training run directories (all their "
                   "ckpt/step_N/model, with router saturation against the last)")
    p.add_argument("--data", nargs="+", required=True, metavar="DATASET",
                   help="dataset directories of `dropup data prepare`, one domain each")
    p.add_argument("--out", required=True, help="output directory (new or empty unless --overwrite)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per domain (default %(default)s)")
    p.add_argument("--split", default=d.split, help="dataset split (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="window length (default 1024, or the models' max positions if smaller)")
    _model_run_args(p, d)
    p.add_argument("--layers", type=int, nargs="+", default=d.layers, metavar="LAYER",
                   help="layers shown in the figures (default: up to 4 spread over depth)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress or table")


def _run_routing(a: argparse.Namespace) -> int:
    from dropup.analysis.specialisation import RoutingOptions, analyze_routing, report_markdown

    opts = {k: v for k, v in vars(a).items() if k not in ("command", "analyze_command", "quiet")}
    result = analyze_routing(RoutingOptions(**opts, progress=not a.quiet))
    if not a.quiet:
        table = report_markdown(result).split("\n## ")[0]
        print(table.strip())
        print(f"wrote {a.out} in {result['seconds']:.1f} s")
    return 0


def _experts_parser(sub) -> None:
    from dropup.analysis.diversity import ExpertsOptions

    d = ExpertsOptions()
    p = sub.add_parser("experts", help="how alike the experts are: weights, outputs, redundancy",
                       description="Per MoE layer: the experts' pairwise weight cosine similarity and "
                       "identical neurons; with --dense, each expert's neurons unchanged from the dense "
                       "source; with --data, linear CKA of the experts' outputs and the loss change per "
                       "dataset when each token's top-ranked experts are removed. A training run "
                       "directory stands for its checkpoints (curves over training).")
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="MoE checkpoint or training run directories")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: experts.json, PNG heatmaps, report.md (replaced if it exists)")
    p.add_argument("--dense", default=None, metavar="SRC", help="the dense checkpoint the MoE was upcycled from")
    p.add_argument("--data", nargs="+", default=[], metavar="DATASET",
                   help="dataset directories (dropup data prepare), one domain each; their val split is used")
    p.add_argument("--tokens", type=int, default=d.tokens,
                   help=f"tokens of each dataset's val split to use (default {d.tokens})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"window length (default {d.seq_len})")
    p.add_argument("--plot-layers", type=int, default=d.plot_layers,
                   help=f"layers drawn as heatmaps per checkpoint (default {d.plot_layers})")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _run_experts(a: argparse.Namespace) -> int:
    from dropup.analysis.diversity import ExpertsOptions, analyze_experts

    opts = ExpertsOptions(dense=a.dense, data=a.data, tokens=a.tokens, seq_len=a.seq_len,
                          plot_layers=a.plot_layers, progress=not a.quiet)
    analyze_experts(a.ckpts, a.out, opts)
    if not a.quiet:
        print(f"dropup analyze experts: wrote {a.out}/experts.json and report.md")
    return 0


# `dropup analyze NAME`: one entry per analysis, (add its parser, run it).
ANALYSES = {"routing": (_routing_parser, _run_routing), "experts": (_experts_parser, _run_experts)}


def _analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="look inside MoE checkpoints and training runs: routing, experts",
                       description="Analyses of MoE checkpoints: " + ", ".join(ANALYSES) + ".")
    asub = p.add_subparsers(dest="analyze_command", required=True, metavar="{" + ",".join(ANALYSES) + "}")
    for add, _ in ANALYSES.values():
        add(asub)


def _run_analyze(a: argparse.Namespace) -> int:
    return ANALYSES[a.analyze_command][1](a)


COMMANDS = {"upcycle": (_upcycle_parser, _run_upcycle), "inspect": (_inspect_parser, _run_inspect),
            "demo": (_demo_parser, _run_demo), "repro": (_repro_parser, _run_repro), "train": (_train_parser, _run_train),
            "data": (_data_parser, _run_data), "generate": (_generate_parser, _run_generate),
            "eval": (_eval_parser, _run_eval), "analyze": (_analyze_parser, _run_analyze)}


def build_parser() -> argparse.ArgumentParser:
    from dropup._version import __version__

    parser = Parser(prog="dropup", description="Drop-Upcycling toolkit: build, "
                    "train and analyse MoE models from dense checkpoints.")
    parser.add_argument("--version", action="version", version=f"dropup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse reports these on the top-level parser; the command's --help is the useful one.
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the innermost command that ``args`` names (``dropup data prepare``'s for it)."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, sub.dest, None) not in sub.choices:
            break
        parser = sub.choices[getattr(args, sub.dest)]
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so the same cleanup runs."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Schedulers stop jobs with SIGTERM; its default action kills the process before any
    # ``finally`` runs, leaving a temporary directory as large as the output. Signals can only be
    # handled in the main thread (main called from another thread keeps the default).
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return COMMANDS[args.command][1](args)
    except UserError as e:
        print(f"dropup {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"dropup {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 128 + int(signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    finally:
        if in_main:
            # None: the previous handler was not installed from Python; the default stands in.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
