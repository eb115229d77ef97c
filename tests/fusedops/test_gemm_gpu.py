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
from tests.helpers import assert_close, assert_lowp_close

pytestmark = pytest.mark.gpu

SHAPES = [((1,), 5, 7), ((127,), 33, 65), ((3, 100), 257, 200), ((256,), 11008, 4096)]
CASES = [(torch.bfloat16, s) for s in SHAPES] + [
    (torch.float16, SHAPES[1]), (torch.float16, SHAPES[2]),
    (torch.float32, SHAPES[1]), (torch.float32, SHAPES[2]),
]


def _floor(t):
    return 2.0**-8 * t.abs().max().item() + 1e-6  # half a bf16 ulp of the largest output


@pytest.mark.parametrize("dtype, shape", CASES, ids=lambda v: str(v))
def test_gpu_swiglu_and_residual(dtype, shape):
    lead, n, k = shape
    x, w, dy = make_case(lead, n, k, dtype, seed=n + k, device="cuda")
    r = torch.randn(*lead, 2 * n, device="cuda", dtype=dtype)
    dy2 = torch.randn(*lead, 2 * n, device="cuda", dtype=dtype)
    got_s, got_r = run_swiglu(x, w, dy, "triton"), run_residual(x, w, r, dy2, "triton")
    if dtype == torch.float32:
        for a, b in zip(got_s, truth_swiglu(x, w, dy)):
            assert_close(a, b, dtype=torch.float32)
        for a, b in zip(got_r, truth_residual(x, w, r, dy2)):
            assert_close(a, b, dtype=torch.float32)
        return
    lowp_s, true_s = truth_swiglu(x, w, dy, dtype), truth_swiglu(x, w, dy, torch.float32)
    for a, b, t, name in zip(got_s, lowp_s, true_s, ("y", "dx", "dw")):
        assert a.dtype == dtype
        assert_lowp_close(a, b, t, floor=_floor(t), name=f"swiglu {name}")
    lowp_r, true_r = truth_residual(x, w, r, dy2, dtype), truth_residual(x, w, r, dy2, torch.float32)
    for a, b, t, name in zip(got_r, lowp_r, true_r, ("y", "dx", "dw", "dr")):
        assert_lowp_close(a, b, t, floor=_floor(t), name=f"residual {name}")


def test_gpu_auto_picks_triton_without_warning():
    x, w, _ = make_case((64,), 48, 96, torch.bfloat16, seed=0, device="cuda")
    r = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(linear_swiglu(x, w), linear_swiglu(x, w, impl="triton"))
        assert torch.equal(linear_residual(x, w, r), linear_residual(x, w, r, impl="triton"))
