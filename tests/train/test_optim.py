"""dropup.optim.AdamW: plain AdamW with fp32 states, close to it with bf16 states."""

from __future__ import annotations

import pytest
import torch

from dropup.train.optim import AdamW


def _run(opt_cls, steps=5, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    opt = opt_cls(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def test_fp32_states_match_torch_adamw():
    ours, _ = _run(AdamW, state_dtype=torch.float32)
    ref, _ = _run(torch.optim.AdamW, foreach=False)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_states_are_stored_in_bf16_and_stay_close():
    ours, opt = _run(AdamW, state_dtype=torch.bfloat16)
    ref, _ = _run(torch.optim.AdamW, foreach=False)
    states = [s for s in opt.state.values()]
    assert all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    for p in ours.parameters():
        assert p.dtype == torch.float32


def test_train_config_rejects_unknown_state_dtype(tmp_path):
    from dropup.errors import UserError
    from dropup.train.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: moe-tiny}\ndata: {datasets: [{path: x}]}\nsteps: 1\n"
                   "optim: {state_dtype: int8}\nout_dir: r\n")
    with pytest.raises(UserError, match="state_dtype"):
        load_config(cfg, [])


def test_bf16_states_stay_bf16_when_loaded():
    # load_state_dict casts states to the parameters' dtype; a resumed run must keep bf16 moments
    # (the memory it was sized for, and the same rounding as the run that was never stopped).
    model, opt = _run(AdamW, state_dtype=torch.bfloat16)
    saved = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    fresh = AdamW([{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias]}],
                  state_dtype=torch.bfloat16)
    fresh.load_state_dict(opt.state_dict())
    for k, s in fresh.state_dict()["state"].items():
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(s["exp_avg"], saved[k]["exp_avg"]) and torch.equal(s["exp_avg_sq"], saved[k]["exp_avg_sq"])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fused_update_matches_the_eager_one(state_dtype):
    # The compiled one-kernel update (the CUDA default) computes the eager formula: on the CPU
    # here, forced on, against the eager path. fp32: within rounding. bf16 moments: the compiled
    # kernel may fuse multiply-adds (whether it does depends on the machine's vector units), so
    # an fp32 moment can differ in its last bit and round to the neighbouring bf16 value. One
    # bf16 ulp (2^-8 relative) in a moment moves that step's update, at most about lr in size,
    # by under 2^-7 of it; the bound below allows twice that in every step. A wrong formula
    # (bias correction, decay, eps) is off by a sizeable fraction of lr per step.
    steps, lr = 5, 1e-2
    eager, opt_e = _run(AdamW, steps=steps, state_dtype=state_dtype, fused=False)
    fused, opt_f = _run(AdamW, steps=steps, state_dtype=state_dtype, fused=True)
    atol = 1e-7 if state_dtype == torch.float32 else 2 * steps * lr * 2**-7
    for a, b in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=atol)
    for sf, se in zip(opt_f.state.values(), opt_e.state.values()):
        assert sf["exp_avg"].dtype == state_dtype
        torch.testing.assert_close(sf["exp_avg_sq"].float(), se["exp_avg_sq"].float(), rtol=1e-2, atol=1e-9)


def test_fused_update_of_sharded_parameters_updates_the_local_shards(tmp_path):
    # Under FSDP2 the parameters, gradients and moments are DTensors: the fused update works on
    # each process's local shard. One process (gloo) with its DTensors against plain tensors.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        w, g = torch.randn(8, 4), torch.randn(8, 4)
        plain = torch.nn.Parameter(w.clone())
        sharded = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        plain.grad, sharded.grad = g.clone(), distribute_tensor(g.clone(), mesh, [Shard(0)])
        for param in (plain, sharded):
            opt = AdamW([param], lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, fused=True)
            opt.step()
        assert torch.equal(sharded.full_tensor(), plain.detach())
        assert not torch.equal(plain.detach(), w)
    finally:
        dist.destroy_process_group()
