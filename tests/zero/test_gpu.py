"""CUDA checks (skipped without a GPU): bf16 ZeRO-1 on the device, alone and on one NCCL rank;
the float64 gradient norm on the device in both modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from haillm.zero import Zero1AdamW, ZeroDataParallel
from tests.helpers import norm_rtol, run_distributed
from tests.zero.lockstep import MixedPrecisionLockstep


def _model(device="cuda"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.LayerNorm(96),
                         nn.Linear(96, 33)).to(device, torch.bfloat16)


def _loss(out, y):
    return (out.float() - y).square().mean()


def _train_and_compare(steps=3, micro=2, device="cuda"):
    """bf16 ZeRO-1 with clipping against MixedPrecisionAdamW, step by step from the same state
    (tests/zero/lockstep.py: the same bf16 partial gradients added in other orders, each step to
    `adamw_exact`'s roundings, the bf16 parameters the rounded masters)."""
    ddp = ZeroDataParallel(_model(device), bucket_mb=0.01)
    opt = Zero1AdamW(ddp, lr=1e-2, weight_decay=0.01, precision="bf16", max_grad_norm=1.0)
    check = MixedPrecisionLockstep(ddp, opt, _model(device), _loss, 1.0, lr=1e-2,
                                   weight_decay=0.01)
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        xs = [torch.randn(8, 64, device=device, generator=g).bfloat16() for _ in range(micro)]
        data = [[(x, torch.zeros(8, 33, device=device)) for x in xs]]
        check.sync()
        for k, (x, y) in enumerate(data[0]):
            with ddp.no_sync() if k < micro - 1 else torch.enable_grad():
                (_loss(ddp(x), y) / micro).backward()
        assert not check.step(data).skipped
        opt.zero_grad()
    return True


def test_bf16_zero_step_checks_on_cpu():
    """The same function on CPU: what the GPU tests run is itself tested everywhere."""
    assert _train_and_compare(device="cpu")


@pytest.mark.gpu
def test_bf16_zero_on_cuda_single_process():
    assert _train_and_compare()


@pytest.mark.gpu
def test_bf16_zero_on_one_nccl_rank():
    assert run_distributed(_train_and_compare, 1, backend="nccl", timeout=120) == [True]


def _fp64_norm_both_modes(device="cuda"):
    """The float64 gradient norm on the device (the upcast and dot run there), both modes."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 33))

    g = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(p.shape, generator=g)
             * torch.empty(p.shape).uniform_(-16, 16, generator=g).exp2()
             for n, p in model().named_parameters()}
    ps = [torch.zeros(t.shape, dtype=torch.float64, requires_grad=True) for t in grads.values()]
    for p, t in zip(ps, grads.values()):
        p.grad = t.double()
    ref = torch.nn.utils.clip_grad_norm_(ps, float("inf")).item()
    for shard in (True, False):
        ddp = ZeroDataParallel(model().to(device, torch.bfloat16), bucket_mb=0.01, shard=shard)
        opt = Zero1AdamW(ddp, lr=1e-2, precision="bf16")
        for n, t in grads.items():
            ddp.main_grad_of(n).copy_(t)
        norm, found_inf = opt.grad_norm_and_found_inf()
        rtol = norm_rtol(sum(t.numel() for t in grads.values()), torch.float64)  # the same values, two orders
        assert not found_inf and abs(norm - ref) <= rtol * ref, (shard, norm, ref)
    return True


@pytest.mark.gpu
def test_fp64_grad_norm_on_cuda_both_modes():
    assert _fp64_norm_both_modes("cuda")
