"""Model cards (``README.md`` with the Hub's YAML front matter) and the side files that make an
exported checkpoint usable as it is by transformers, vLLM or lm-evaluation-harness: tokenizer
files and ``generation_config.json``.

The card is a pure function of a dict, so ``dropup upcycle`` stays byte-for-byte reproducible:
no timestamps and no paths of the machine, only directory names (or the Hub id of a Hub cache
snapshot).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

from dropup.convert import ratios
from dropup.errors import UserError
from dropup.hub.digest import sha256_file
from dropup.hub.safetensors import TOKENIZER_FILES

TAGS = ("moe", "mixture-of-experts", "drop-upcycling", "dropup")
# A file among these makes a directory a tokenizer; tokenizer_config.json alone does not.
_TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
_HUB_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def model_name(path: str | os.PathLike | None) -> str | None:
    """What a card may say about where a checkpoint came from: the Hub id of a Hub cache
    snapshot (``.../models--org--name/snapshots/<sha>``), otherwise the directory's name."""
    if not path:
        return None
    p = Path(path)
    m = _HUB_SNAPSHOT.search(p.as_posix())
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return p.resolve().name or None


def parameter_counts(shapes: dict[str, tuple[int, ...]], routed_expert_params: int, num_experts: int,
                     top_k: int) -> tuple[int, int]:
    """(total, active per token): ``routed_expert_params`` is the size of all routed experts of
    all layers together, of which each token uses ``top_k / num_experts``."""
    total = sum(math.prod(s) for s in shapes.values())
    if num_experts <= 0:
        return total, total
    return total, total - routed_expert_params + routed_expert_params * top_k // num_experts


def _human(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _yaml_scalar(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML string: quotes and escapes need no care


def model_card(info: dict) -> str:
    """The README.md text for ``info``:

    ``model_type``, ``layers``, ``num_experts``, ``top_k``, ``total_params``, ``active_params``;
    optional ``base_model`` (a name, never a path), ``upcycling`` (``method``, ``ratio``, ``seed``,
    ``num_experts``, ``source``; ``source_experts`` and ``router_bias`` for an expanded MoE), ``training`` (``steps``, ``tokens``, ``init``, ``router_bias``: the
    selection-bias file, when there is one).
    """
    base = info.get("base_model")
    front = ["---", "library_name: transformers", "tags:", *(f"- {t}" for t in TAGS)]
    if base:
        front.append(f"base_model: {_yaml_scalar(base)}")
    front += ["pipeline_tag: text-generation", "---", ""]
    experts, top_k = info.get("num_experts") or 0, info.get("top_k") or 0
    title = f"{info['model_type']} {'mixture-of-experts' if experts else 'dense'} model"
    body = [f"# {title}", "", "## Architecture", "",
            f"- type: `{info['model_type']}`",
            f"- layers: {info['layers']}"]
    if experts:
        body.append(f"- experts: {experts} per layer, top-{top_k} routing")
    body += [f"- parameters: {_human(info['total_params'])} total, {_human(info['active_params'])} active per token",
             ""]
    up = info.get("upcycling")
    if up:
        built = (f"Expanded from the {up['source_experts']}-expert MoE checkpoint" if up.get("source_experts")
                 else "Upcycled from the dense checkpoint")
        body += ["## How it was built", "",
                 f"{built} `{up.get('source') or 'unknown'}` by dropup (method `{up['method']}`):", ""]
        if up.get("method") in ("drop", "noise") and up.get("ratio") is not None:
            body.append(f"- ratio: {ratios.text(up['ratio'])}" + (" (per layer)" if ratios.is_per_layer(up["ratio"]) else ""))
        body += [f"- experts: {up.get('num_experts', experts)}", f"- seed: {up['seed']}", ""]
        if up.get("router_bias"):
            body += [f"SRC's selection biases (aux-loss-free balancing) are in `{up['router_bias']}`, expanded "
                     "with the experts. transformers ignores that file; dropup's `load_model` applies them.", ""]
    tr = info.get("training")
    if tr:
        body += ["## Training", "",
                 f"Trained by dropup for {tr['steps']:,} steps on {tr['tokens']:,} tokens"
                 + (f", starting from `{tr['init']}`." if tr.get("init") else ", from a random initialisation."),
                 ""]
        if tr.get("router_bias"):
            body += [f"Its routers were balanced without an auxiliary loss (DeepSeek-V3's selection bias): the "
                     f"per-layer biases are in `{tr['router_bias']}`. transformers ignores that file and routes "
                     "without them; dropup's `load_model` applies them and routes as in training.", ""]
    body += ["## Use", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "",
             "tokenizer = AutoTokenizer.from_pretrained(PATH)",
             "model = AutoModelForCausalLM.from_pretrained(PATH)",
             "```", ""]
    return "\n".join(front + body)


def upcycling_info(record: dict) -> dict:
    """The card's ``upcycling`` entry from an ``upcycling.json`` record."""
    opts = record.get("options", {})
    return {"method": record.get("method"), "ratio": opts.get("ratio"), "seed": record.get("seed"),
            "num_experts": opts.get("num_experts"),
            "source": model_name(record.get("source", {}).get("path")),
            **{k: v for k, v in (record.get("expansion") or {}).items() if k in ("source_experts", "router_bias")}}


def write_model_card(out: str | os.PathLike, info: dict) -> None:
    (Path(out) / "README.md").write_text(model_card(info))


# ---- tokenizers ------------------------------------------------------------------------------



def has_tokenizer(path: str | os.PathLike | None) -> bool:
    return bool(path) and any((Path(path) / f).is_file() for f in _TOKENIZER_CORE)


def dataset_tokenizer(paths: list[str | os.PathLike]) -> Path | None:
    """The tokenizer directory the datasets were prepared with (``dropup data prepare`` records it
    in meta.json); None when none records one. ``UserError`` when they record different ones."""
    from dropup.data.tokens import tokenizer_dir  # the dataset format's reader (data builds on hub)

    found: list[tuple[Path, str | None, Path]] = []
    for ds in paths:
        try:
            meta = json.loads((Path(ds) / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # the data loader reports a dataset it cannot read
        tdir = tokenizer_dir(ds, meta) if isinstance(meta, dict) else None
        if tdir is not None and has_tokenizer(tdir):
            found.append((Path(ds), meta["tokenizer"].get("sha256") or _file_sha(tdir), tdir))
    for ds, sha, tdir in found[1:]:
        if sha != found[0][1] and not _same_vocabulary(found[0][2], tdir):
            raise UserError(f"datasets {found[0][0]} and {ds} were tokenised with different tokenizers "
                            "(their vocabularies differ); prepare all datasets of a run with one tokenizer")
    return found[0][2] if found else None


def _file_sha(tdir: Path) -> str | None:
    return sha256_file(tdir / "tokenizer.json") if (tdir / "tokenizer.json").is_file() else None


def check_tokenizers(init: str | os.PathLike | None, datasets: list[str | os.PathLike]) -> Path | None:
    """The tokenizer of a run: the init checkpoint's when it has one, else the datasets'. Raises
    ``UserError`` (one line) when the datasets disagree, or when init's tokenizer.json differs
    from the datasets' (token ids would mean different text in the export than in training)."""
    data_tok = dataset_tokenizer(datasets)
    if has_tokenizer(init):
        if data_tok and not _same_vocabulary(Path(init), data_tok):
            raise UserError(f"model.init {init} has a different tokenizer from the datasets' ({data_tok}): "
                            "their vocabularies differ; prepare the data with --tokenizer "
                            f"{init}")
        return Path(init)
    return data_tok


def _same_vocabulary(a: Path, b: Path) -> bool:
    """Whether two tokenizer directories map the same tokens to the same ids. The files alone
    cannot say: ``dropup data prepare`` saves the tokenizer it was given through transformers,
    which rewrites tokenizer.json (other formatting, other version fields) without changing it."""
    if _file_sha(a) is not None and _file_sha(a) == _file_sha(b):
        return True
    if not (a / "tokenizer.json").is_file() or not (b / "tokenizer.json").is_file():
        return True  # nothing comparable (e.g. a sentencepiece-only init): not a proven mismatch
    from tokenizers import Tokenizer

    try:
        va, vb = (Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True)
                  for d in (a, b))
    except Exception:  # noqa: BLE001 - unreadable and not byte-identical: no proof that they agree
        return False
    return va == vb


def run_inputs(run_config: dict) -> tuple[str | None, list[str]]:
    """``model.init`` and the dataset paths of a run's config as a checkpoint's trainer.json holds it."""
    init = (run_config.get("model") or {}).get("init")
    from dropup.hub.gguf import dequantised  # (hub.gguf imports this module)

    init = str(dequantised(init) or init) if init else init  # a GGUF: its copy held by the run, if any
    datasets = [d["path"] for d in (run_config.get("data") or {}).get("datasets", []) if d.get("path")]
    return init, datasets


def run_tokenizer(run_config: dict) -> Path | None:
    """``check_tokenizers`` for a run's config as a checkpoint's trainer.json holds it."""
    return check_tokenizers(*run_inputs(run_config))


def _token_id(tdir: Path, token) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    try:
        tj = json.loads((tdir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    for added in tj.get("added_tokens", []):
        if added.get("content") == token:
            return added.get("id")
    vocab = (tj.get("model") or {}).get("vocab")
    return vocab.get(token) if isinstance(vocab, dict) else None


def generation_config(config: dict, tokenizer_dir: Path | None, eos_token_id: int | None = None) -> dict:
    """A minimal generation_config.json: bos/eos ids from config.json, else from the tokenizer,
    else ``eos_token_id`` (the datasets' end-of-document id)."""
    ids = {k: config.get(k) for k in ("bos_token_id", "eos_token_id")}
    if tokenizer_dir is not None and any(v is None for v in ids.values()):
        try:
            tc = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            tc = {}
        for key in ids:
            if ids[key] is None:
                ids[key] = _token_id(tokenizer_dir, tc.get(key.removesuffix("_id")))
    if ids["eos_token_id"] is None:
        ids["eos_token_id"] = eos_token_id
    return {k: v for k, v in ids.items() if v is not None}


def copy_tokenizer_files(tokenizer_dir: Path | None, init: str | os.PathLike | None, out: Path,
                         config: dict, eos_token_id: int | None = None) -> list[str]:
    """Tokenizer files from ``tokenizer_dir`` and ``generation_config.json`` from ``init`` (or a
    minimal one) into ``out``; the names written."""
    written = []
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            f = tokenizer_dir / fname
            if fname != "generation_config.json" and f.is_file():
                shutil.copyfile(f, out / fname)
                written.append(fname)
    gen = Path(init) / "generation_config.json" if init else None
    if gen is not None and gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
    else:
        (out / "generation_config.json").write_text(
            json.dumps(generation_config(config, tokenizer_dir, eos_token_id), indent=2) + "\n")
    written.append("generation_config.json")
    return written
