"""Fused GEMMs on a real GPU: bf16 (which the interpreter cannot check), fp16, fp32, and shapes
with tails on every dimension, including the 7B MLP's N = 11008 and K = 4096."""

from __future__ import annotations

import warnings

import pytest
import torch

from haillm.fusedops import linear_residual, linear_swiglu
from tests.fusedops.test_gemm import (
    make_case,
    run_residual,
    run_swiglu,
    truth_residual,
    truth_swiglu,
)
from tests.helpers import assert_lowp_close

pytestmark = pytest.mark.gpu
DEVICE = "cuda"

SHAPES = [((1,), 5, 7), ((127,), 33, 65), ((3, 100), 257, 200), ((256,), 11008, 4096)]
CASES = [(torch.bfloat16, s) for s in SHAPES] + [
    (torch.float16, SHAPES[1]), (torch.float16, SHAPES[2]),
    (torch.float32, SHAPES[1]), (torch.float32, SHAPES[2]),
]


# floor=0.0: where PyTorch happens to be exact the kernel may still lose the output's own
# rounding, eps(dtype) x max|truth| (assert_lowp_close's floor in any dtype), nothing absolute.


@pytest.mark.parametrize("dtype, shape", CASES, ids=lambda v: str(v))
def test_gpu_swiglu_and_residual(dtype, shape):
    """Kernel error <= 2 x error of PyTorch in the same dtype, both against fp64 truth
    (fp32 included: its rounding over K = 4096 exceeds any fixed tolerance table entry)."""
    lead, n, k = shape
    x, w, dy = make_case(lead, n, k, dtype, seed=n + k, device=DEVICE)
    r = torch.randn(*lead, 2 * n, device=DEVICE, dtype=dtype)
    dy2 = torch.randn(*lead, 2 * n, device=DEVICE, dtype=dtype)
    got = run_swiglu(x, w, dy, "triton")
    same = truth_swiglu(x, w, dy, dtype)  # separate nn.Linear layers in the kernel's dtype
    truth = truth_swiglu(x, w, dy, torch.float64)  # same rounded inputs, fp64
    for a, b, t, name in zip(got, same, truth, ("y", "dx", "dw")):
        assert a.dtype == dtype and a.shape == t.shape
        assert_lowp_close(a, b, t, floor=0.0, name=f"swiglu {name}")
    got = run_residual(x, w, r, dy2, "triton")
    same = truth_residual(x, w, r, dy2, dtype)
    truth = truth_residual(x, w, r, dy2, torch.float64)
    for a, b, t, name in zip(got, same, truth, ("y", "dx", "dw", "dr")):
        assert_lowp_close(a, b, t, floor=0.0, name=f"residual {name}")


def test_gpu_auto_picks_triton_without_warning():
    x, w, _ = make_case((64,), 48, 96, torch.bfloat16, seed=0, device=DEVICE)
    r = torch.randn(64, 96, device=DEVICE, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(linear_swiglu(x, w), linear_swiglu(x, w, impl="triton"))
        assert torch.equal(linear_residual(x, w, r), linear_residual(x, w, r, impl="triton"))


def test_gpu_tma_and_pointer_loads_agree_bf16():
    from haillm.fusedops.gemm.ops import _tma_ok, swiglu_bwd_triton, swiglu_fwd_triton

    x, w, dy = make_case((256,), 11008, 4096, torch.bfloat16, seed=1, device=DEVICE)
    assert _tma_ok(x, w) == (torch.cuda.get_device_capability()[0] >= 9)
    truth = truth_swiglu(x, w, dy, torch.float64)
    same = truth_swiglu(x, w, dy, torch.bfloat16)
    for tma in (False, True):
        y = swiglu_fwd_triton(x, w, tma=tma)
        assert_lowp_close(y, same[0], truth[0], floor=0.0,
                          name=f"y tma={tma}")
    a, b = (swiglu_bwd_triton(x, w, dy, tma=t).float() for t in (False, True))
    assert (a - b).abs().max().item() <= 2.0**-7 * a.abs().max().item()
