"""`--verify`: load the upcycled checkpoint with transformers and check it against the dense model.

Every tensor must be consumed by transformers (a misnamed expert would otherwise stay at its
random initialisation without a word). Where the method is function-preserving (its entry in
``methods.METHODS`` says so: naive, drop or noise with r = 0), the MoE's logits must equal the
dense model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dropup.convert.methods import METHODS
from dropup.errors import UserError

BATCH, SEQ = 2, 32  # random tokens the logits are compared on


def _load(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the checkpoint is broken
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"verify: transformers did not load {path} ({first[:200]})") from None
    return model.eval(), info


def expects_dense_logits(provenance: dict) -> bool:
    o = provenance["options"]
    return (provenance.get("function_preserving_target", True)
            and METHODS[o["method"]].preserves_dense(o["ratio"]))


def verify(src: Path, out: Path, provenance: dict | None = None, seed: int = 0) -> dict:
    """Returns a report; raises UserError when the checkpoint is broken."""
    if provenance is None:
        provenance = json.loads((Path(out) / "upcycling.json").read_text())
    moe, info = _load(out)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                      "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:3]}" for k, v in problems.items())
        raise UserError(f"verify: transformers did not load {out} cleanly ({detail})")
    vocab = moe.config.vocab_size
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        moe_logits = moe(tokens).logits
    report = {"loaded_cleanly": True, "logits_finite": bool(torch.isfinite(moe_logits).all())}
    if not report["logits_finite"]:
        raise UserError(f"verify: {out} produces non-finite logits")
    del moe
    if expects_dense_logits(provenance):
        dense, _ = _load(src)
        with torch.no_grad():
            dense_logits = dense(tokens).logits
        diff = (moe_logits - dense_logits).abs().max().item()
        scale = max(1.0, dense_logits.abs().max().item())
        report.update(max_abs_logit_diff=diff, matches_dense=diff <= 1e-4 * scale)
        if not report["matches_dense"]:
            raise UserError(f"verify: logits differ from the dense model by {diff:.3g} although "
                            f"method {provenance['options']['method']} should preserve them")
    return report
