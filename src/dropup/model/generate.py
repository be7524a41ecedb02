"""`dropup generate`: a few tokens from a checkpoint through transformers, to see at a glance that
an upcycled or trained model still produces text (the reference implementation, not ours, runs
it: what a user's own transformers script would get)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dropup.errors import UserError
from dropup.hub.card import has_tokenizer


def generate(path: str | os.PathLike, prompt: str, *, max_new_tokens: int = 32, sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, tokenizer: str | None = None) -> str:
    """The prompt and its continuation, decoded. Greedy unless ``sample``; sampled draws come
    from ``seed``."""
    path = Path(path)
    tok_dir = Path(tokenizer) if tokenizer else path
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    if not has_tokenizer(tok_dir):
        raise UserError(f"{tok_dir} has no tokenizer files; pass --tokenizer DIR (e.g. the dataset's "
                        "tokenizer/ directory)")
    if max_new_tokens < 1 or not 0 < top_p <= 1 or not temperature > 0:
        raise UserError("--max-new-tokens must be >= 1, --top-p in (0, 1] and --temperature > 0")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                     trust_remote_code=False).eval()
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the directory cannot be used
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"transformers could not load {path} ({first[:200]})") from None
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise UserError("--prompt encodes to no tokens; give some text")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_p=top_p if sample else None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=False)
