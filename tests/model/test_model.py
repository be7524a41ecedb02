"""dropup.model / hf_io / losses against transformers: logits, router logits, aux loss, checkpoint round trip,
and the grouped-GEMM MoE path against the per-expert loop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from dropup.analysis.routing import router_metrics  # noqa: E402
from dropup.hub.config import ModelConfig  # noqa: E402
from dropup.model.decoder import MoE, build_model, gather_rows, select_experts  # noqa: E402
from dropup.model.io import load_model, save_model  # noqa: E402
from dropup.train.losses import load_balancing_loss, router_z_loss  # noqa: E402

torch.set_num_threads(1)
SEQ = 24  # longer than the sliding windows and the dynamic-RoPE max_position_embeddings below
TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# name -> (config class, kwargs). Together they cover GQA, tied embeddings, every RoPE type,
# sliding windows (all layers, some layers), qkv / attention bias, q/k norm, explicit head_dim,
# qwen2_moe's shared expert and dense layers, norm_topk_prob False and True.
CASES = {
    "llama-llama3rope-bias-tied": (
        "LlamaConfig",
        dict(intermediate_size=96, attention_bias=True, tie_word_embeddings=True,
             rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64)),
    ),
    "mistral-sliding-linearrope": (
        "MistralConfig",
        dict(intermediate_size=96, sliding_window=7, rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0)),
    ),
    "qwen2-sliding-some-layers-dynamicrope": (
        "Qwen2Config",
        dict(intermediate_size=96, num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1,
             tie_word_embeddings=True, max_position_embeddings=16,
             rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    ),
    "qwen3-qknorm-headdim-yarn": (
        "Qwen3Config",
        dict(intermediate_size=96, head_dim=24, num_key_value_heads=1,
             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=256)),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe-shared-dense-layer": (
        "Qwen2MoeConfig",
        dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=40, num_hidden_layers=3,
             num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1]),
    ),
    "qwen3_moe-normtopk": (
        "Qwen3MoeConfig",
        dict(intermediate_size=80, moe_intermediate_size=32, num_experts=5, num_experts_per_tok=2, norm_topk_prob=True,
             head_dim=16, attention_bias=True),
    ),
    "granite-multipliers-bias": (
        "GraniteConfig",
        dict(intermediate_size=96, attention_bias=True, embedding_multiplier=4.0, residual_multiplier=0.3,
             attention_multiplier=0.2, logits_scaling=3.0),
    ),
    "granitemoe-multipliers-stacked": (
        "GraniteMoeConfig",
        dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
             residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=1.5, tie_word_embeddings=True),
    ),
}  # fmt: skip


def make_hf_model(name: str, seed: int = 0):
    cls, kwargs = CASES[name]
    cfg = getattr(transformers, cls)(**{**TINY, **kwargs})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    # Random everything (norm gains and biases too, so a wrong placement shows); routers get a
    # larger scale so that routing is decisive and the top-k are not near-ties.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith((".gate.weight", "shared_expert_gate.weight", ".router.weight")):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (transformers model, checkpoint dir written by its save_pretrained)."""
    out = {}
    for name in CASES:
        model = make_hf_model(name)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def input_ids(vocab: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_checkpoints_use_hub_per_expert_names(hf_models):
    # The parity tests below are only meaningful if the checkpoints have the Hub's layout.
    for name, expected in [
        ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2.weight"),
        ("qwen2_moe-shared-dense-layer", "model.layers.0.mlp.experts.5.down_proj.weight"),
        ("qwen2_moe-shared-dense-layer", "model.layers.0.mlp.shared_expert_gate.weight"),
        ("qwen3_moe-normtopk", "model.layers.1.mlp.experts.0.gate_proj.weight"),
        ("granitemoe-multipliers-stacked", "model.layers.1.block_sparse_moe.input_linear.weight"),
    ]:
        with safe_open(str(hf_models[name][1] / "model.safetensors"), "pt") as f:
            assert expected in f.keys(), name


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(hf_models, name):
    hf, path = hf_models[name]
    ours = load_model(path)
    ids = input_ids(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=ours.config.is_moe)
        logits, router_logits = ours(ids, return_router_logits=True)
    assert logits.shape == (2, SEQ, hf.config.vocab_size)
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    if ours.config.is_moe:
        ref_router = [r for r in ref.router_logits if r is not None]
        assert len(router_logits) == len(ref_router) == sum(map(ours.config.is_moe_layer, range(ours.config.num_hidden_layers)))
        for a, b in zip(router_logits, ref_router):
            assert (a - b.reshape(a.shape)).abs().max().item() <= 1e-5


def test_config_is_resolved_from_hf_spellings(hf_models):
    cfg = load_model(hf_models["qwen2-sliding-some-layers-dynamicrope"][1]).config
    assert cfg.sliding_windows == [None, 5, 5] and cfg.qkv_bias and cfg.tie_word_embeddings
    assert cfg.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    cfg = load_model(hf_models["mistral-sliding-linearrope"][1]).config
    assert cfg.sliding_windows == [7, 7] and not cfg.qkv_bias and cfg.rope_theta == 500.0
    cfg = load_model(hf_models["qwen2_moe-shared-dense-layer"][1]).config
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert not cfg.norm_topk_prob and cfg.shared_expert_intermediate_size == 40
    cfg = load_model(hf_models["mixtral"][1]).config
    assert cfg.norm_topk_prob and cfg.num_experts == 4 and cfg.moe_intermediate_size == 48
    # A transformers-4 style config.json (rope_theta + rope_scaling with "type") reads the same.
    old = ModelConfig.from_hf(
        dict(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    )  # fmt: skip
    assert old.rope_theta == 5e5 and old.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert old.num_key_value_heads == 2 and old.head_dim == 8
    back = old.to_hf()
    assert back["rope_theta"] == 5e5 and back["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_aux_loss_pooled_matches_transformers(hf_models):
    hf, path = hf_models["mixtral"]
    ours = load_model(path)
    ids = input_ids(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        _, router_logits = ours(ids, return_router_logits=True)
    k, e = hf.config.num_experts_per_tok, hf.config.num_local_experts
    ref_aux = load_balancing_loss_func(ref.router_logits, e, k)
    assert torch.allclose(load_balancing_loss(router_logits, k, e, mode="pooled"), ref_aux, atol=1e-6)
    # The model's own aux_loss output is the same function times nothing (coef applied separately).
    assert torch.allclose(ref.aux_loss, ref_aux)
    # With a padding mask too.
    mask = torch.ones(2, SEQ)
    mask[1, 15:] = 0
    ref_masked = load_balancing_loss_func(ref.router_logits, e, k, attention_mask=mask)
    assert torch.allclose(load_balancing_loss(router_logits, k, e, mask=mask), ref_masked, atol=1e-6)


def test_aux_loss_modes_and_z_loss():
    torch.manual_seed(0)
    e, k = 4, 2
    logits = [torch.randn(10, e) for _ in range(3)]
    per_layer = [load_balancing_loss([r], k, e, mode="per-layer") for r in logits]
    assert torch.allclose(load_balancing_loss(logits, k, e, mode="per-layer"), torch.stack(per_layer).mean())
    # pooled == per-layer for a single layer, and pooled of identical layers == one layer.
    assert torch.allclose(load_balancing_loss(logits[:1], k, e), per_layer[0])
    assert torch.allclose(load_balancing_loss([logits[0]] * 3, k, e), per_layer[0])
    # Perfectly uniform routing: loss == top_k.
    assert torch.allclose(load_balancing_loss([torch.zeros(8, e)], k, e, mode="per-layer"), torch.tensor(float(k)))
    z = router_z_loss(logits)
    assert torch.allclose(z, torch.stack([torch.logsumexp(r, -1).pow(2).mean() for r in logits]).mean())
    m = router_metrics(logits, k, e)
    assert m["load"].shape == (3, e) and torch.allclose(m["load"].sum(-1), torch.ones(3))
    with pytest.raises(ValueError):
        load_balancing_loss(logits, k, e, mode="global")


@pytest.mark.parametrize("name", ["qwen2_moe-shared-dense-layer", "llama-llama3rope-bias-tied",
                                  "granitemoe-multipliers-stacked"])
def test_save_reload_in_transformers_identical(hf_models, tmp_path, name):
    hf, path = hf_models[name]
    ours = load_model(path)
    out = tmp_path / "saved"
    save_model(ours, out)
    # Same tensors under the same names as the source checkpoint...
    with safe_open(str(path / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    # ...and transformers loads it as the same model.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ref_sd, new_sd = hf.state_dict(), reloaded.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    for key in ref_sd:
        assert torch.equal(ref_sd[key], new_sd[key]), key
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["model_type"] == hf.config.model_type
    assert reloaded.config.to_dict()["rope_parameters"] == hf.config.to_dict()["rope_parameters"]
    ids = input_ids(hf.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
    # Saving over an existing directory replaces the weights and keeps other files.
    (out / "tokenizer.json").write_text("{}")
    save_model(ours, out, max_shard_bytes=20_000)  # forces several shards + index
    assert (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "model.safetensors.index.json").exists()
    resharded = load_model(out)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, resharded.state_dict()[key]), key


def test_dtype_and_device_arguments(hf_models):
    ours = load_model(hf_models["mixtral"][1], device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    logits = ours(input_ids(96))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_missing_tensor_is_a_clear_error(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from dropup.errors import UserError

    _, path = hf_models["mixtral"]
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(UserError, match="missing.*experts.2.w3"):
        load_model(tmp_path)


def _grouped_mm_runs_on_cpu() -> bool:
    try:
        x = torch.randn(4, 8, requires_grad=True)
        w = torch.randn(2, 8, 8)
        torch._grouped_mm(x, w, offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm does not run on CPU in this torch; "
                    "the grouped path is then checked on a GPU only")  # fmt: skip
@pytest.mark.parametrize("shared", [False, True])
def test_grouped_and_loop_moe_agree(shared):
    cfg = ModelConfig(
        model_type="qwen2_moe", vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=24, norm_topk_prob=False, shared_expert_intermediate_size=16 if shared else 0,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.router.weight[5] = -1.0  # with positive inputs expert 5 gets no tokens: empty groups must work
    x = torch.randn(3, 11, 32).abs()
    up = torch.randn(3, 11, 32)  # a non-trivial upstream gradient
    results = {}
    for impl in ("loop", "grouped"):
        moe.impl = impl
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        out = moe(xi)
        logits = moe.take_router_logits()
        ((out * up).sum() + logits.pow(2).sum()).backward()
        results[impl] = (out.detach(), xi.grad, {n: p.grad.clone() for n, p in moe.named_parameters()})
    (o1, gx1, g1), (o2, gx2, g2) = results["loop"], results["grouped"]
    assert torch.allclose(o1, o2, atol=1e-5)
    assert torch.allclose(gx1, gx2, atol=1e-5)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-5), n
    assert g1["experts.gate_proj"][5].abs().max() == 0  # the unused expert gets no gradient


def test_select_experts_is_topk_with_ties_to_the_lowest_index():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 8, generator=gen).softmax(-1)
    bias = torch.randn(8, generator=gen) * 0.01
    for k in (1, 2, 3, 8):
        for b in (None, bias):
            scores = probs if b is None else probs + b
            assert torch.equal(select_experts(probs, b, k), scores.topk(k, dim=-1).indices)
    tied = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.4, 0.1, 0.4, 0.1]])
    assert select_experts(tied, None, 2).tolist() == [[1, 2], [0, 2]]
    assert select_experts(tied, torch.zeros(4), 3).tolist() == [[1, 2, 3], [0, 2, 1]]


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_gather_rows_matches_indexing_with_a_gather_backward(repeats):
    # The routing's dispatch (each token k times, in expert order) and combine (a permutation):
    # the same values and gradients as plain indexing, whose backward is a scatter-add.
    gen = torch.Generator().manual_seed(0)
    n, d = 13, 5
    order = torch.randperm(n * repeats, generator=gen)
    back = torch.empty_like(order).scatter_(0, order, torch.arange(n * repeats))
    index = order // repeats if repeats > 1 else order
    src = torch.randn(n, d, generator=gen, dtype=torch.float64)
    up = torch.randn(n * repeats, d, generator=gen, dtype=torch.float64)
    a, b = src.clone().requires_grad_(), src.clone().requires_grad_()
    got, ref = gather_rows(a, index, back, repeats), b[index]
    (got * up).sum().backward()
    (ref * up).sum().backward()
    assert torch.equal(got, ref)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_grouped_path_in_full_model_matches_transformers(hf_models):
    if not _grouped_mm_runs_on_cpu():
        pytest.skip("torch._grouped_mm does not run on CPU in this torch")
    hf, path = hf_models["qwen3_moe-normtopk"]
    ours = load_model(path, moe_impl="grouped")
    ids = input_ids(hf.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_naive_upcycle_computes_the_dense_function(hf_models, tmp_path):
    # Mixtral renormalises the top-k weights, so E identical copies of the dense FFN give back
    # exactly the dense model whatever the router says: the converter's r = 0 invariant.
    from dropup.model.decoder import CausalLM, build_model

    dense = load_model(hf_models["mistral-sliding-linearrope"][1])
    moe_hf = {**dense.config.to_hf(), "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    moe = build_model(ModelConfig.from_hf(moe_hf))
    assert isinstance(moe, CausalLM) and moe.config.sliding_windows == dense.config.sliding_windows
    state = moe.state_dict()
    for name, value in dense.state_dict().items():
        mlp = name.rsplit(".", 2)
        if ".mlp." in name:
            state[f"{mlp[0]}.experts.{mlp[1]}"] = value.expand_as(state[f"{mlp[0]}.experts.{mlp[1]}"]).clone()
        else:
            state[name] = value
    moe.load_state_dict(state)
    save_model(moe, tmp_path / "moe")
    moe = load_model(tmp_path / "moe")
    ids = input_ids(96)
    with torch.no_grad():
        assert (moe(ids) - dense(ids)).abs().max().item() <= 1e-5


def test_backward_reaches_every_parameter(hf_models):
    from dropup.model.lm_loss import cross_entropy

    model = load_model(hf_models["qwen2_moe-shared-dense-layer"][1])
    ids = input_ids(96)
    logits, router_logits = model(ids[:, :-1], return_router_logits=True)
    loss = cross_entropy(logits, ids[:, 1:]) + 0.02 * load_balancing_loss(router_logits, 3, 6)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (grouped GEMM in bf16)")
def test_grouped_cuda_bf16_matches_loop_without_host_sync():
    cfg = ModelConfig(
        model_type="qwen2_moe", vocab_size=8, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=128, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=512, norm_topk_prob=False, shared_expert_intermediate_size=128,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(cfg).cuda()  # fp32 master weights, bf16 compute under autocast as in training
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(4, 512, 256, device="cuda")
    up = torch.randn_like(x)
    results = {}
    for impl in ("loop", "grouped"):
        moe.impl = impl
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        torch.cuda.synchronize()
        if impl == "grouped":
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = moe(xi)
            (out.float() * up).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results[impl] = (out.float(), xi.grad, {n: p.grad.clone() for n, p in moe.named_parameters()})
    (o1, gx1, g1), (o2, gx2, g2) = results["loop"], results["grouped"]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(o2, o1) < 1e-2 and rel(gx2, gx1) < 1e-2
    for n in g1:
        assert rel(g2[n], g1[n]) < 2e-2, n
    moe.impl = "auto"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(moe(x), results["grouped"][0])  # auto picks grouped


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm does not run on CPU in this torch")
def test_compiled_layers_share_one_graph_and_return_router_logits():
    """Regional compilation compiles a decoder layer once for every layer: collecting the router
    logits must not make the graphs depend on the layer's position (a growing list argument did,
    and past torch's recompile limit the layers silently ran eager)."""
    from torch._dynamo.utils import counters

    from dropup.model.presets import PRESETS

    def graphs(layers: int) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        torch._dynamo.reset()
        counters.clear()
        cfg = ModelConfig.from_hf({**PRESETS["moe-tiny"], "vocab_size": 32, "hidden_size": 16,
                                   "intermediate_size": 16, "num_hidden_layers": layers})
        torch.manual_seed(0)
        model = build_model(cfg, dtype=torch.bfloat16)
        model.set_moe_impl("grouped")  # the compiled training path (the loop syncs on expert counts)
        ids = torch.randint(0, 32, (2, 8))
        _, eager = model(ids, return_router_logits=True)
        model.compile_layers(backend="eager")  # dynamo's tracing and guards, without code generation
        model(ids, return_router_logits=True)
        first = counters["stats"]["unique_graphs"]
        _, compiled = model(ids, return_router_logits=True)
        assert counters["stats"]["unique_graphs"] == first  # no recompilation on the next call
        return first, eager, compiled

    few, _, _ = graphs(2)
    many, eager, compiled = graphs(9)  # more layers than torch's default recompile limit (8)
    assert many == few
    assert len(compiled) == 9
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    torch._dynamo.reset()
