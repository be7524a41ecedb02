"""`--verify`: run the upcycled checkpoint in transformers, one layer at a time, against the dense model.

It answers two questions. Does transformers read every tensor (a misnamed expert would otherwise
stay at its random initialisation without a word)? And what does the conversion cost: the
largest logit difference and the change in next-token loss against the dense model on the same
token windows (real text with ``--verify-text``, seeded random tokens otherwise). Methods that
preserve the dense function (naive; drop or noise with r = 0; see ``methods.METHODS``) must match
the dense logits, or the conversion is reported broken; for the others the report says why it is
not exact and by how much.

Memory stays bounded by streaming the depth: for each layer i, transformers builds a one-layer
model of the same architecture from the embeddings, the final norm, the LM head and layer i's own
tensors (its own loading and weight conversion, e.g. transformers 5's fused experts, so the check
is transformers' and not ours), and the hidden states of the windows pass through it. Peak memory
is one layer plus the embeddings and head in float32, plus the windows' logits, for a model of
any depth.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

from dropup.convert import ratios
from dropup.convert.methods import METHODS
from dropup.errors import UserError
from dropup.hub import names as archs
from dropup.hub.safetensors import CheckpointReader, read_json_object

RANDOM_WINDOWS, TEXT_WINDOWS, WINDOW = 4, 8, 128  # token windows the two models are compared on
MIN_TEXT_TOKENS = 17  # one window of 16 predictions
TEXT_BYTES = 4 << 20  # of --verify-text read; far more than 8 windows need
RELATIVE_TOLERANCE = 1e-4  # of the largest dense logit (at least 1): float32 reordering, not a bug


def _method_preserves(provenance: dict) -> bool:
    o = provenance["options"]
    method = METHODS[o["method"]]
    # --shared-expert dense: the shared expert is the dense FFN and the routed experts are silent,
    # so whatever the method did to them, the MoE is the dense model (its non-FFN tensors copied).
    if o.get("shared_expert") == "dense" and method.non_ffn == "copy":
        return True
    return all(method.preserves_dense(r) for r in ratios.recorded(provenance) or (o["ratio"],))


def _routing_preserved(provenance: dict) -> bool:
    """An expanded MoE routes as SRC only at top-(k m) (docs/expand.md); a dense SRC has no routing."""
    return provenance.get("expansion", {}).get("top_k_preserves", True)


def expects_dense_logits(provenance: dict) -> bool:
    return (provenance.get("function_preserving_target", True) and _method_preserves(provenance)
            and _routing_preserved(provenance))


def why_not_exact(provenance: dict) -> str | None:
    """Why the MoE does not compute the dense function at step 0 (None when it does)."""
    o = provenance["options"]
    reasons = []
    if not _method_preserves(provenance):
        reasons.append(f"method {o['method']} " + METHODS[o["method"]].changes.format(ratio=ratios.text(o["ratio"])))
    if not _routing_preserved(provenance):
        x = provenance["expansion"]
        reasons.append(f"top-{o['top_k']} is not SRC's top-{x['source_top_k']} times the expansion factor "
                       f"{x['factor']}, so the experts are chosen differently")
    if not provenance.get("function_preserving_target", True):
        reasons.append(f"target {provenance['target']} normalises queries and keys, which the "
                       f"{provenance.get('source', {}).get('config', {}).get('model_type', 'dense')} source does not")
    return "; ".join(reasons) or None


def text_windows(path: Path, tokenizer_dir: Path) -> torch.Tensor:
    """Up to TEXT_WINDOWS windows of WINDOW + 1 tokens of the file, tokenised by SRC's tokenizer."""
    from transformers import AutoTokenizer

    if not path.is_file():
        raise UserError(f"--verify-text {path} is not a file; pass a UTF-8 text file")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - no or unreadable tokenizer files: the same advice
        raise UserError(f"--verify-text needs SRC's tokenizer, and {tokenizer_dir} has none that "
                        "transformers loads; drop --verify-text to compare on random tokens") from None
    with open(path, "rb") as f:
        text = f.read(TEXT_BYTES).decode("utf-8", errors="replace")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < MIN_TEXT_TOKENS:
        raise UserError(f"--verify-text {path} is only {len(ids)} tokens; give at least "
                        f"{MIN_TEXT_TOKENS} (a paragraph or more)")
    n = min(TEXT_WINDOWS, max(1, (len(ids) - 1) // WINDOW))
    length = min(WINDOW, len(ids) - 1)
    return torch.tensor([ids[i * length : i * length + length + 1] for i in range(n)])


def random_windows(vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (RANDOM_WINDOWS, WINDOW + 1), generator=gen)


class _StreamedModel:
    """A checkpoint run through transformers one decoder layer at a time (see the module docstring)."""

    def __init__(self, path: Path, what: str):
        from transformers import AutoConfig

        self.path, self.what = Path(path), what
        self.reader = CheckpointReader(path, what)
        self.config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        self.layers = self.config.num_hidden_layers
        by_layer: dict[int, list[str]] = {}
        self.globals: list[str] = []
        for name in self.reader.tensors:
            layer = archs.layer_of(name)
            (by_layer.setdefault(layer, []) if layer is not None else self.globals).append(name)
        self.by_layer = by_layer
        stray = sorted(set(by_layer) - set(range(self.layers)))
        if stray:
            raise UserError(f"verify: {path} holds tensors of layer {stray[0]}, but its config.json has "
                            f"{self.layers} layers")
        self._globals = {n: self.reader.get(n).float() for n in self.globals}

    def _layer_config(self, i: int):
        """The config of a one-layer model whose only layer is layer i of this one."""
        c = copy.deepcopy(self.config)
        c.num_hidden_layers = 1
        if getattr(c, "layer_types", None):
            c.layer_types = [self.config.layer_types[i]]
        if hasattr(c, "mlp_only_layers"):  # Qwen-MoE: which layers are dense
            sparse_step = getattr(c, "decoder_sparse_step", 1) or 1
            dense = i in (self.config.mlp_only_layers or []) or (i + 1) % sparse_step != 0
            c.mlp_only_layers, c.decoder_sparse_step = ([0] if dense else []), 1
        return c

    def _layer_model(self, i: int):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        prefix, local = f"model.layers.{i}.", "model.layers.0."
        state = dict(self._globals)
        state.update({local + n[len(prefix):]: self.reader.get(n).float() for n in self.by_layer.get(i, [])})
        config = self._layer_config(i)
        try:
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32,
                                              output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - whatever transformers raises, the checkpoint is broken
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"verify: transformers did not load layer {i} of {self.path} ({first[:200]})") from None
        problems = {k: v for k, v in info.items()
                    if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            detail = "; ".join(f"{k}: {sorted(str(x).replace(local, prefix) for x in v)[:3]}"
                               for k, v in problems.items())
            raise UserError(f"verify: transformers did not load {self.path} cleanly ({detail})")
        return model.eval()

    def logits(self, tokens: torch.Tensor, advance) -> torch.Tensor:
        """The model's logits for ``tokens`` [B, S], one layer in memory at a time."""
        hidden = None
        for i in range(self.layers):
            model = self._layer_model(i)
            block = model.model.layers[0]
            seen = {}

            def feed(module, args, kwargs):  # layer i's input is layer i-1's output
                if hidden is None:
                    return None
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            def keep(module, args, kwargs, output):
                seen["hidden"] = output[0] if isinstance(output, tuple) else output

            hooks = [block.register_forward_pre_hook(feed, with_kwargs=True),
                     block.register_forward_hook(keep, with_kwargs=True)]
            try:
                with torch.no_grad():  # the LM head's full output only after the last layer
                    out = model(input_ids=tokens, use_cache=False,
                                logits_to_keep=0 if i == self.layers - 1 else 1).logits
            finally:
                for h in hooks:
                    h.remove()
            hidden = seen["hidden"]
            del model
            advance()
        return out.float()


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


def _bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]verify[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=True)


def windows(vocab_size: int, src: Path, text: str | Path | None = None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The token windows to compare on and what they are; called before converting, so a bad
    ``--verify-text`` fails before any work."""
    if text is not None:
        return text_windows(Path(text), Path(src)), f"text of {Path(text).name}"
    return random_windows(vocab_size, seed), "random tokens"


def verify(src: Path, out: Path, provenance: dict | None = None, tokens: tuple[torch.Tensor, str] | None = None,
           progress: bool = False) -> dict:
    """The report of what was measured on ``tokens`` (from ``windows``; default: random tokens);
    raises UserError when the checkpoint is broken."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    t0 = time.perf_counter()
    if provenance is None:
        provenance = read_json_object(Path(out) / "upcycling.json", "dropup's provenance record")
    moe = _StreamedModel(out, "the upcycled checkpoint")
    tokens, where = tokens or windows(moe.config.vocab_size, src)
    with _bar(progress and sys.stderr.isatty()) as bar:
        task = bar.add_task("MoE", total=2 * moe.layers)
        moe_logits = moe.logits(tokens, lambda: bar.advance(task))
        if not bool(torch.isfinite(moe_logits).all()):
            raise UserError(f"verify: {out} produces non-finite logits")
        del moe
        bar.update(task, description="dense")
        dense = _StreamedModel(src, "SRC")
        dense_logits = dense.logits(tokens, lambda: bar.advance(task))
    diff = (moe_logits - dense_logits).abs().max().item()
    scale = max(1.0, dense_logits.abs().max().item())
    dense_loss, moe_loss = _loss(dense_logits, tokens), _loss(moe_logits, tokens)
    reason = why_not_exact(provenance)
    report = {
        "loaded_cleanly": True, "logits_finite": True, "tokens": where,
        "windows": list(tokens.shape), "max_abs_logit_diff": diff,
        "dense_loss": round(dense_loss, 5), "moe_loss": round(moe_loss, 5),
        "loss_change": round(moe_loss - dense_loss, 5), "exact": reason is None,
        **({"reference": "the MoE SRC's"} if "expansion" in provenance else {}),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if reason is None:
        report["matches_dense"] = diff <= RELATIVE_TOLERANCE * scale
        if not report["matches_dense"]:
            raise UserError(f"verify: logits differ from the dense model by {diff:.3g} although "
                            f"method {provenance['options']['method']} should preserve them")
    else:
        report["not_exact_because"] = reason
    return report


def summary(report: dict) -> str:
    """One line for the terminal."""
    b, s = report["windows"]
    head = (f"verify: transformers loads every tensor; on {b} x {s - 1} predictions of {report['tokens']}: "
            f"max logit difference {report['max_abs_logit_diff']:.3g}, loss {report['dense_loss']:.4f} -> "
            f"{report['moe_loss']:.4f} nats ({report['loss_change']:+.4f})")
    if report["exact"]:
        return head + f"; exact (the MoE computes {report.get('reference', 'the dense')} function)"
    return head + f"; not exact: {report['not_exact_because']}"
