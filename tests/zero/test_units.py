"""Single-process tests: bucket layout, loss scaler, memory formula, argument errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from haillm.zero import (
    DynamicLossScaler,
    Zero1AdamW,
    ZeroDataParallel,
    build_layout,
    memory_per_rank,
    weight_decay_groups,
)
from tests.helpers import norm_rtol
from tests.zero.lockstep import TorchAdamWLockstep


@given(numels=st.lists(st.integers(1, 300), min_size=1, max_size=12),
       dp=st.sampled_from([1, 2, 3, 4, 8]), bucket=st.integers(1, 700))
def test_layout_covers_every_element_once(numels, dp, bucket):
    layouts = [build_layout(numels, dp=dp, rank=r, bucket_numel=bucket) for r in range(dp)]
    L = layouts[0]
    assert L.numel % dp == 0 and L.shard_numel * dp == L.numel
    assert L.padding == L.numel - sum(numels) >= 0
    assert L.padding < len(L.buckets) * dp * 16 + len(L.buckets)  # bounded padding
    # buckets are contiguous, divisible by dp, in reverse parameter order
    start = 0
    order = []
    for b in L.buckets:
        assert b.start == start and b.numel % dp == 0
        start += b.numel
        order += b.params
    assert order == list(reversed(range(len(numels))))
    # every parameter element belongs to exactly one segment of exactly one rank
    pieces: list[list[tuple[int, int]]] = [[] for _ in numels]
    for r, lay in enumerate(layouts):
        for s in lay.segments:
            bucket_ = lay.buckets[s.bucket]
            c0, cn = bucket_.chunk(r, dp)
            assert c0 <= s.buffer_start and s.buffer_start + s.numel <= c0 + cn
            assert s.buffer_start == L.param_offsets[s.param] + s.param_start
            assert s.shard_start == lay.shard_offset(s.bucket) + s.buffer_start - c0
            pieces[s.param].append((s.param_start, s.param_start + s.numel))
    for n, runs in zip(numels, pieces):  # the pieces tile [0, n) without gaps or overlaps
        runs.sort()
        assert runs[0][0] == 0 and runs[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))


def test_layout_errors():
    with pytest.raises(ValueError, match="bucket_numel"):
        build_layout([3], dp=1, rank=0, bucket_numel=0)
    with pytest.raises(ValueError, match="rank"):
        build_layout([3], dp=2, rank=2, bucket_numel=4)


def test_loss_scaler_backoff_and_growth():
    s = DynamicLossScaler(init_scale=2.0**10, growth_interval=3)
    s.update(found_inf=True)
    assert s.scale == 2.0**9 and s.clean_steps == 0
    for _ in range(2):
        s.update(found_inf=False)
    assert s.scale == 2.0**9
    s.update(found_inf=False)
    assert s.scale == 2.0**10 and s.clean_steps == 0
    s.update(found_inf=False)
    s.update(found_inf=True)  # an overflow resets the clean-step count
    s.update(found_inf=False)
    s.update(found_inf=False)
    assert s.scale == 2.0**9
    loss = torch.tensor(1.5)
    assert s.scale_loss(loss).item() == 1.5 * 2.0**9
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.clean_steps) == (s.scale, s.clean_steps)
    tiny = DynamicLossScaler(init_scale=1.0)
    tiny.update(True)
    assert tiny.scale == 1.0  # min_scale
    for kw, match in [(dict(init_scale=0), "init_scale"), (dict(growth_factor=1.0), "growth"),
                      (dict(backoff_factor=1.0), "backoff"), (dict(growth_interval=0), "interval")]:
        with pytest.raises(ValueError, match=match):
            DynamicLossScaler(**kw)


def test_memory_formula():
    m = memory_per_rank(1000, 4)
    assert m == {"params": 2000.0, "grads": 4000.0, "optimizer": 3000.0, "total": 9000.0}
    assert memory_per_rank(1000, 4, zero=False)["optimizer"] == 12000.0
    # fp32 parameters are their own master weights: m and v only (torch ZeRO's 8 B/element)
    assert memory_per_rank(1000, 4, param_bytes=4)["optimizer"] == 2000.0
    with pytest.raises(ValueError, match="dp"):
        memory_per_rank(10, 0)
    # shard= is ZeroDataParallel's name for the same flag; unsharded = plain DP for every N_d
    assert memory_per_rank(1000, 4, shard=True) == m == memory_per_rank(1000, 4, zero=True)
    assert memory_per_rank(1000, 4, shard=False) == memory_per_rank(1000, 4, zero=False)
    assert memory_per_rank(1000, 4, shard=False)["total"] == (2 + 4 + 12) * 1000
    assert memory_per_rank(1000, 4, param_bytes=4, shard=False)["optimizer"] == 8000.0
    with pytest.raises(ValueError, match="disagree"):
        memory_per_rank(10, 2, zero=True, shard=False)


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)).to(dtype)


def test_errors_single_process():
    with pytest.raises(ValueError, match="bucket_mb"):
        ZeroDataParallel(_mlp(), bucket_mb=0)
    with pytest.raises(ValueError, match="bucket_mb"):
        ZeroDataParallel(_mlp(), bucket_mb=-1.0)
    m = _mlp()
    m[2].to("meta")
    with pytest.raises(ValueError, match="one device"):
        ZeroDataParallel(m)
    m = _mlp()
    m[1].to(torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        ZeroDataParallel(m)
    with pytest.raises(TypeError, match="ZeroDataParallel"):
        Zero1AdamW(_mlp(), lr=1e-3)
    with pytest.raises(ValueError, match="precision='bf16' expects"):
        Zero1AdamW(ZeroDataParallel(_mlp()), lr=1e-3, precision="bf16")
    with pytest.raises(ValueError, match="precision must be"):
        Zero1AdamW(ZeroDataParallel(_mlp()), lr=1e-3, precision="fp8")
    with pytest.raises(ValueError, match="max_grad_norm"):
        Zero1AdamW(ZeroDataParallel(_mlp()), lr=1e-3, precision="fp32", max_grad_norm=0.0)
    with pytest.raises(ValueError, match="reduce_scatter must be"):
        ZeroDataParallel(_mlp(), reduce_scatter="ring")
    with pytest.raises(ValueError, match="grad_dtype"):
        ZeroDataParallel(_mlp(), grad_dtype=torch.float16)


def test_weight_decay_groups_and_double_backward_error():
    ddp = ZeroDataParallel(_mlp())
    groups = weight_decay_groups(ddp, 0.1)
    assert [len(g["params"]) for g in groups] == [2, 4]  # 2 weight matrices; biases + norm
    assert groups[1]["weight_decay"] == 0.0
    opt = Zero1AdamW(ddp, lr=1e-2, precision="fp32", param_groups=groups)
    x = torch.randn(4, 5)
    ddp(x).sum().backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        ddp(x).sum().backward()  # second synced backward without zero_grad
    opt.zero_grad()
    ddp(x).sum().backward()
    res = opt.step()
    assert not res.skipped and res.grad_norm > 0


def test_single_process_equals_torch_adamw():
    """dp = 1 without torch.distributed: a plain fp32 AdamW with grad accumulation, every step
    against torch.optim.AdamW on the whole batch from the same state (tests/zero/lockstep.py:
    the gradient to the low-precision rule, each step to `adamw_exact`'s roundings)."""
    ddp = ZeroDataParallel(_mlp(), bucket_mb=64 * 4 / 2**20)
    opt = Zero1AdamW(ddp, lr=1e-2, weight_decay=0.05, precision="fp32")
    check = TorchAdamWLockstep(ddp, opt, _mlp, lambda out, y: (out - y).square().mean())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        xs = [torch.randn(3, 5, generator=g) for _ in range(2)]
        check.sync()
        for i, x in enumerate(xs):
            with ddp.no_sync() if i == 0 else torch.enable_grad():
                (ddp(x).square().mean() / 2).backward()
        check.step([[(x, torch.zeros(3, 3)) for x in xs]])
        opt.zero_grad()


def test_lr_scheduler_and_hparams():
    """Zero1AdamW is a torch Optimizer: LR schedulers drive its per-group learning rates."""
    ddp = ZeroDataParallel(_mlp())
    opt = Zero1AdamW(ddp, lr=1e-2, precision="fp32", param_groups=weight_decay_groups(ddp, 0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(2):
        ddp(torch.randn(2, 5)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [2.5e-3, 2.5e-3]
    with pytest.raises(RuntimeError, match="after construction"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="two param_groups"):
        Zero1AdamW(ddp, lr=1e-2, precision="fp32",
                   param_groups=[{"params": ddp.params}, {"params": ddp.params[:1]}])
    with pytest.raises(ValueError, match="miss"):
        Zero1AdamW(ddp, lr=1e-2, precision="fp32", param_groups=[{"params": ddp.params[:1]}])


def _grads_for(module, seed, spread):
    """fp32 gradients whose magnitudes span 2^±spread (squares: twice that)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g)
            * torch.empty(p.shape).uniform_(-spread, spread, generator=g).exp2()
            for n, p in module.named_parameters()}


@given(dims=st.tuples(st.integers(1, 40), st.integers(2, 60), st.integers(1, 40)),
       bucket=st.integers(1, 400), seed=st.integers(0, 2**16), spread=st.integers(0, 30))
def test_norm_is_fp64_in_both_modes(dims, bucket, seed, spread):
    """One process (degree 1): the norm is clip_grad_norm_ in float64 to `norm_rtol(n, float64)`, whatever the
    bucket layout, in both modes; and at degree 1 both modes run bitwise the same steps."""
    d_in, d_hid, d_out = dims

    def mlp():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, d_hid), nn.LayerNorm(d_hid), nn.Linear(d_hid, d_out))

    grads = _grads_for(mlp(), seed, spread)
    ps = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g.double()
    ref = torch.nn.utils.clip_grad_norm_(ps, float("inf")).item()
    runs = []
    for shard in (True, False):
        ddp = ZeroDataParallel(mlp(), bucket_mb=bucket * 4 / 2**20, shard=shard)
        assert ddp.layout.dp == 1 and ddp.comm == ("reduce_scatter" if shard else "all_reduce")
        opt = Zero1AdamW(ddp, lr=1e-2, weight_decay=0.1, precision="fp32", max_grad_norm=0.3)
        for n, g in grads.items():
            ddp.main_grad_of(n).copy_(g)
        norm, found_inf = opt.grad_norm_and_found_inf()
        rtol = norm_rtol(sum(g.numel() for g in grads.values()), torch.float64)  # the same values, two orders
        assert not found_inf and abs(norm - ref) <= rtol * ref, (shard, norm, ref)
        opt.step()  # clipped (0.3) with this norm
        opt.zero_grad()
        x = torch.randn(3, d_in, generator=torch.Generator().manual_seed(seed))
        for _ in range(2):
            ddp(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append((norm, ddp.param_buffer.clone(), opt.full_state_dict()))
    (n1, p1, f1), (n2, p2, f2) = runs
    assert n1 == n2 and torch.equal(p1, p2)  # degree 1: the same layout and the same ops
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(f1[key][k], f2[key][k]) for k in f1[key])
