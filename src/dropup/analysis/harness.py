"""EleutherAI's lm-evaluation-harness (``pip install 'dropup[eval]'``) on dropup's datasets and
checkpoints.

``write_tasks`` turns the validation documents of datasets made by ``dropup data prepare`` back
into text (each document decoded with the dataset's own tokenizer, its appended EOS left out)
and writes, per dataset, a JSON-lines file and a task YAML in the style of lm-eval's wikitext
perplexity task: ``loglikelihood_rolling`` over each whole document, scored as
``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``. Then::

    lm_eval --model hf --model_args pretrained=CKPT --include_path DIR --tasks dropup_prose

computes per-domain bits per byte from local files only. ``run_lm_eval`` is the same through
lm-eval's Python API (any of its own tasks too), ``format_table`` its result table.

How lm-eval scores such a task (lm_eval.models.huggingface.HFLM.loglikelihood_rolling): the
document text is encoded with the model's tokenizer, cut into disjoint windows of the model's
maximum length, the first window conditioned on one prefix token (the tokenizer's BOS, else its
EOS), later windows on the tokens before them; every token of the document is scored once (its
EOS is not part of the text, so it is not). lm-eval encodes with the tokenizer's default special
tokens: a tokenizer that adds BOS itself (Llama's) has that BOS scored as a first target too (one
token per document, and a costly one: models rarely predict BOS); ``data prepare`` adds none. The
bits per byte of a task are the corpus sums -sum(log p) / (ln 2 * sum of UTF-8 bytes), not a mean
over documents.

Paths: lm-eval hands ``data_files`` to ``datasets.load_dataset`` as they are (relative paths
would be relative to the working directory, not to the YAML), so the YAMLs name their JSON-lines
files by absolute path: a moved task directory is written again.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from dropup.data.tokens import TokenFile, tokenizer_dir
from dropup.errors import UserError
from dropup.hub.atomic import Existing, atomic_dir
from dropup.options import Precision, check_choices, check_ranges, ranged

INSTALL = "pip install 'dropup[eval]'"
TASK_PREFIX = "dropup_"
# metric -> lm-eval's aggregation of it (corpus sums: the same as its wikitext task)
METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
           "bits_per_byte": "bits_per_byte"}
_DECODE_BATCH = 1024  # documents decoded (and re-encoded) at a time: bounded memory on big splits


# ---- task files ----------------------------------------------------------------------------------


def task_name(name: str) -> str:
    """``dropup_<name>`` with anything but letters, digits and underscores made an underscore
    (lm-eval task names are also file names and glob patterns)."""
    return TASK_PREFIX + (re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_").lower() or "data")


def _dataset_tokenizer(path: Path, meta: dict):
    """The tokenizer a dataset was made with: meta.json's ``tokenizer.path``, relative to the
    dataset directory (``data prepare`` saves it there)."""
    from dropup.data.prepare import load_tokenizer

    tdir = tokenizer_dir(path, meta)
    if tdir is None:
        raise UserError(f"dataset {path} has no tokenizer directory (meta.json tokenizer.path); "
                        "lm-eval tasks need the text, so prepare the data with `dropup data prepare`")
    return load_tokenizer(tdir)


def _documents(file: TokenFile, max_docs: int | None):
    """(token ids without the appended EOS) of each document of the split, in order."""
    eos = file.meta.get("eos_token_id")
    eos_appended = (file.meta.get("prepare") or {}).get("eos_appended", eos is not None)
    n = len(file.offsets) - 1 if max_docs is None else min(max_docs, len(file.offsets) - 1)
    for d in range(n):
        ids = np.asarray(file.tokens[int(file.offsets[d]) : int(file.offsets[d + 1])], dtype=np.int64)
        if eos_appended and eos is not None and ids.size and ids[-1] == eos:
            ids = ids[:-1]
        yield ids.tolist()


@dataclass
class _Written:
    docs: int = 0
    tokens: int = 0  # without the EOS tokens
    bytes: int = 0  # UTF-8 bytes of the texts, what lm-eval divides by
    mismatches: int = 0  # documents whose text does not re-encode to the dataset's token ids


def _write_jsonl(out: Path, file: TokenFile, tok, max_docs: int | None) -> _Written:
    w = _Written()
    with open(out, "w", encoding="utf-8") as f:
        batch: list[list[int]] = []

        def flush() -> None:
            # skip_special_tokens=False: a special token inside a document is part of its text
            texts = tok.backend.decode_batch(batch, skip_special_tokens=False)
            again = tok.backend.encode_batch(texts, add_special_tokens=False)
            for i, (ids, text, enc) in enumerate(zip(batch, texts, again)):
                f.write(json.dumps({"text": text, "doc": w.docs + i}, ensure_ascii=False) + "\n")
                w.tokens += len(ids)
                w.bytes += len(text.encode("utf-8"))
                w.mismatches += enc.ids != ids
            w.docs += len(batch)
            batch.clear()

        for ids in _documents(file, max_docs):
            batch.append(ids)
            if len(batch) == _DECODE_BATCH:
                flush()
        if batch:
            flush()
    return w


def _task_yaml(name: str, data_file: Path, split: str, dataset: Path, w: _Written, meta: dict) -> str:
    tok = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        "test_split": split,
        "output_type": "loglikelihood_rolling",
        # the whole document is the target: a feature name is taken as it is, no template
        # rendering between the decoded text and what lm-eval encodes
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in METRICS.items()],
        "metadata": {"version": 1.0, "dataset": str(dataset), "split": split, "domain": meta.get("domain"),
                     "docs": w.docs, "tokens": w.tokens, "bytes": w.bytes,
                     "roundtrip_mismatches": w.mismatches, "tokenizer_sha256": tok.get("sha256")},
    }
    return "# written by dropup (dropup.analysis.harness.write_tasks)\n" + yaml.safe_dump(cfg, sort_keys=False)


def _group_yaml(group: str, tasks: list[str]) -> str:
    # The group's bits per byte is the macro average over the datasets (each domain counts the
    # same), as `dropup eval` reports it; a task's own value is the corpus-level one.
    cfg = {"group": group, "task": tasks,
           "aggregate_metric_list": [{"metric": "bits_per_byte", "aggregation": "mean", "weight_by_size": False}],
           "metadata": {"version": 1.0}}
    return "# written by dropup (dropup.analysis.harness.write_tasks)\n" + yaml.safe_dump(cfg, sort_keys=False)


def write_tasks(out_dir: str | os.PathLike, datasets: list[str | os.PathLike], split: str = "val",
                max_docs: int | None = None, names: list[str] | None = None,
                group: str | None = "dropup", existing: Existing = "refuse") -> list[str]:
    """Write an lm-eval task per dataset into ``out_dir``; return the task names.

    For each dataset directory (made by ``dropup data prepare``): ``<task>.jsonl`` with the
    decoded text of each document of ``split`` (the first ``max_docs`` when given), one JSON
    object ``{"text", "doc"}`` a line, and ``<task>.yaml``. Task names are ``dropup_<name>``,
    the name being ``names[i]``, else the dataset's domain (meta.json), else its directory name.
    With ``group``, also ``<group>.yaml``: a group of all the tasks whose ``bits_per_byte`` is
    their macro average. Each YAML's ``metadata`` records the documents, tokens (EOS excluded)
    and UTF-8 bytes written, and ``roundtrip_mismatches``: documents whose text does not
    re-encode to the dataset's tokens (0 for a byte-level BPE; a warning otherwise, since
    lm-eval then scores a slightly different text). ``out_dir`` appears whole or not at all
    (``existing`` as for ``dropup.hub.atomic.atomic_dir``).
    """
    if not datasets:
        raise UserError("no datasets given; name the directories made by `dropup data prepare`")
    if names is not None and len(names) != len(datasets):
        raise UserError(f"{len(names)} task names for {len(datasets)} datasets; give one name per dataset")
    if max_docs is not None and (isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs < 1):
        raise UserError(f"max_docs must be a positive integer, got {max_docs!r}")
    if group is not None and not re.fullmatch(r"[0-9A-Za-z_]+", group):
        raise UserError(f"group name {group!r}: use letters, digits and underscores (it is a file name too)")
    files = [TokenFile(d, split) for d in datasets]
    for f in files:
        if len(f.offsets) < 2:
            raise UserError(f"dataset {f.path} has no documents in its {split!r} split; prepare it with "
                            "--val-fraction above 0 or choose another split")
    tasks = []
    for i, f in enumerate(files):
        base = names[i] if names is not None else (f.meta.get("domain") or f.path.resolve().name)
        tasks.append(task_name(str(base)))
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise UserError(f"two datasets would both be task {dup[0]}; give distinct names (one per dataset)")
    if group is not None and group in tasks:
        raise UserError(f"the group name {group!r} is also a task name; choose another group name")
    tokenizers = [_dataset_tokenizer(f.path, f.meta) for f in files]

    final = Path(out_dir).resolve()  # the YAMLs name the files where they will end up
    with atomic_dir(out_dir, existing=existing, label="DIR") as tmp:
        for name, f, tok in zip(tasks, files, tokenizers):
            w = _write_jsonl(tmp / f"{name}.jsonl", f, tok, max_docs)
            recorded = f.info.get("bytes")
            if w.mismatches or (max_docs is None and recorded is not None and recorded != w.bytes):
                warnings.warn(f"{name}: {w.mismatches} of {w.docs} documents do not decode to text that "
                              f"re-encodes to their tokens ({w.bytes} bytes decoded, {recorded} recorded by "
                              "data prepare); lm-eval scores the decoded text", stacklevel=2)
            (tmp / f"{name}.yaml").write_text(
                _task_yaml(name, final / f"{name}.jsonl", split, f.path.resolve(), w, f.meta))
        if group is not None:
            (tmp / f"{group}.yaml").write_text(_group_yaml(group, tasks))
    return tasks


# ---- running lm-eval -----------------------------------------------------------------------------


@dataclass
class LmEvalOptions:
    device: str = "cpu"
    dtype: Precision = "float32"
    batch_size: int = ranged(8, ge=1, integer=True)
    limit: int | None = ranged(None, ge=1, integer=True, hint="documents per task")

    def validate(self) -> None:
        check_choices(self)
        check_ranges(self)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"lm-evaluation-harness is not installed; {INSTALL}") from None
    return lm_eval, TaskManager


def _check_checkpoint(model_dir: Path) -> None:
    where = "a Hugging Face model directory (config.json, *.safetensors and the tokenizer)"
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        hint = ("; a training run's models are RUN/ckpt/step_N/model" if (model_dir / "ckpt").is_dir() else "")
        raise UserError(f"{model_dir} is not {where}{hint}")
    if not any(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir} has no *.safetensors weights; dropup reads weights only from "
                        f"safetensors (convert with transformers' save_pretrained(safe_serialization=True))")
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()):
        raise UserError(f"{model_dir} has no tokenizer (tokenizer.json); lm-eval needs the model's tokenizer "
                        "beside its weights (dropup's exports include it)")


def task_manager(tasks: list[str], include_path: str | os.PathLike | list | None = None):
    """(an lm-eval ``TaskManager`` that knows every name of ``tasks``, the names with glob patterns
    expanded, in the order given), else ``UserError`` naming the first unknown one. lm-eval's own
    task index takes about 10 s to build, so it is left out when ``include_path`` holds all the
    tasks."""
    _, TaskManager = _import_lm_eval()
    paths = None if include_path is None else [str(p) for p in
                                                (include_path if isinstance(include_path, list) else [include_path])]
    for p in paths or []:
        if not Path(p).is_dir():
            raise UserError(f"include path {p} is not a directory (write one with write_tasks)")

    def expand(tm) -> list[list[str]]:
        return [tm.match_tasks([t]) for t in tasks]

    def result(tm, found) -> tuple:
        names = [n for group in found for n in group]
        return tm, list(dict.fromkeys(names))

    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        found = expand(tm)
        if all(found):
            return result(tm, found)
    tm = TaskManager(include_path=paths)
    found = expand(tm)
    missing = [t for t, f in zip(tasks, found) if not f]
    if missing:
        raise UserError(f"unknown lm-eval task {missing[0]!r}; `lm_eval ls tasks` lists them"
                        + (f" (tasks in {', '.join(paths)} included)" if paths else
                           "; tasks written by `dropup eval --write-lm-eval-tasks DIR` need --include-path DIR"))
    return result(tm, found)


def split_tasks(tasks: str | list[str]) -> list[str]:
    """Task names as lm-eval's ``--tasks`` takes them: a comma-separated string or a list."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [t.strip() for t in items if t.strip()]


def run_lm_eval(model_dir: str | os.PathLike, tasks: str | list[str], include_path=None, device: str = "cpu",
                dtype: str = "float32", batch_size: int = 8, limit: int | None = None,
                seed: int = 1234) -> dict:
    """lm-eval's ``simple_evaluate`` on the Hugging Face checkpoint ``model_dir`` (its ``hf``
    model, local files, no remote code, weights from safetensors) for ``tasks``; its result
    dict (``results``, ``groups``, ``configs``, ...; no per-sample logs).

    ``tasks`` are names, groups or glob patterns, as a list or comma-separated. ``include_path`` names directories of extra task YAMLs (``write_tasks``'); ``limit`` caps
    the documents per task (the first ones). The datasets of lm-eval's own tasks come from the
    Hugging Face cache or the Hub as its environment variables say (HF_DATASETS_OFFLINE);
    ``write_tasks``' tasks read local files only. ``seed`` seeds lm-eval's random draws (few-shot
    sampling; rolling log-likelihood draws nothing).
    """
    tasks = split_tasks(tasks)
    if not tasks:
        raise UserError("no lm-eval tasks given; name them, e.g. dropup_prose or hellaswag")
    opts = LmEvalOptions(device=device, dtype=dtype, batch_size=batch_size, limit=limit)
    opts.validate()
    model_dir = Path(model_dir)
    _check_checkpoint(model_dir)
    lm_eval, _ = _import_lm_eval()
    tm, tasks = task_manager(tasks, include_path)
    model_args = {"pretrained": str(model_dir.resolve()), "dtype": opts.dtype, "trust_remote_code": False,
                  "use_safetensors": True, "local_files_only": True}
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, task_manager=tm, device=opts.device,
        batch_size=opts.batch_size, limit=opts.limit, log_samples=False, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # lm-eval returns None on ranks other than 0 of a distributed run
        return {}
    return dict(results)


def format_table(results: dict) -> str:
    """lm-eval's own result table (Markdown), with its group table below when there are groups."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def to_json(results: dict) -> str:
    """The results as JSON (what ``lm_eval --output_path`` writes; dtypes and the like as
    strings), for ``dropup.hub.atomic.atomic_write_text``."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


def bits_per_byte(results: dict, task: str) -> float:
    """A task's ``bits_per_byte`` from lm-eval's results (its key is ``bits_per_byte,none``)."""
    value = results["results"][task].get("bits_per_byte,none")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise KeyError(f"{task} has no bits_per_byte in these results")
    return float(value)
