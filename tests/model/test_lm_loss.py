"""The chunked LM-head cross entropy equals the plain one, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dropup.hub.config import ModelConfig
from dropup.model.decoder import build_model
from dropup.model.lm_loss import lm_head_cross_entropy


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_lm_head_ce_matches_plain(chunk):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 20, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 50, (3, 20), generator=gen)
    t[0, :5] = -100  # ignored positions
    ref = F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), ignore_index=-100)
    gh, gw = torch.autograd.grad(ref * 3.0, (h, w))
    got = lm_head_cross_entropy(h, w, t, chunk=chunk)
    fh, fw = torch.autograd.grad(got * 3.0, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-6)


def test_chunked_lm_head_ce_without_grad():
    h, w = torch.randn(10, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (10,))
    with torch.no_grad():
        got = lm_head_cross_entropy(h, w, t, chunk=3)
    torch.testing.assert_close(got, F.cross_entropy(h @ w.t(), t))


@pytest.mark.parametrize("tied", [False, True])
def test_model_targets_path_equals_logits_path(tied):
    cfg = ModelConfig.from_hf(dict(
        model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=tied, max_position_embeddings=64))
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, 64, (2, 17))
    ref = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = model(x[:, :-1], targets=x[:, 1:])
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the out_dtype GEMM accumulation "
                    "and the compiled chunk are CUDA-only)")  # fmt: skip
def test_chunked_lm_head_ce_on_cuda_under_bf16_autocast():
    # The CUDA path: bf16 matmuls, the compiled chunk, the weight gradient accumulated in fp32 by
    # addmm(out_dtype=float32). Against the plain fp32 loss: bf16-sized errors, not layout errors.
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3000, 64, device="cuda", generator=gen, requires_grad=True)
    w = (torch.randn(500, 64, device="cuda", generator=gen) * 0.1).requires_grad_()
    t = torch.randint(0, 500, (3000,), device="cuda", generator=gen)
    ref = F.cross_entropy(h @ w.t(), t)
    gh, gw = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = lm_head_cross_entropy(h, w, t, chunk=1024)  # three chunks, the last one short
    fh, fw = torch.autograd.grad(got, (h, w))
    assert fh.dtype == h.dtype and fw.dtype == w.dtype
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    for a, b in ((fh, gh), (fw, gw)):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
