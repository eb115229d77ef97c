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
    """dp = 1 without torch.distributed: a plain fp32 AdamW with grad accumulation."""
    ref = _mlp()
    ddp = ZeroDataParallel(_mlp(), bucket_mb=64 * 4 / 2**20)
    opt = Zero1AdamW(ddp, lr=1e-2, weight_decay=0.05, precision="fp32")
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        xs = [torch.randn(3, 5, generator=g) for _ in range(2)]
        for i, x in enumerate(xs):
            with ddp.no_sync() if i == 0 else torch.enable_grad():
                (ddp(x).square().mean() / 2).backward()
        ref(torch.cat(xs)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ropt.step()
        ropt.zero_grad()
    for p, q in zip(ddp.module.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


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
