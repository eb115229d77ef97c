"""Fused GEMMs: linear_swiglu / linear_residual (reference and Triton-in-the-interpreter paths),
MergedLinear and SwiGLUMLP against separate nn.Linear layers + activation."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from haillm.fusedops import MergedLinear, SwiGLUMLP, linear_residual, linear_swiglu
from haillm.fusedops.gemm import swiglu_backward_reference
from tests.helpers import (
    assert_close,
    assert_lowp_close,
    assert_within_roundings,
    gemm_magnitudes,
    linear_residual_roundings,
    swiglu_roundings,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")


# --------------------------------------------------------------------------- the truth
def separate_swiglu(x, gate: nn.Linear, up: nn.Linear):
    """The unfused model code: two nn.Linear layers and the activation."""
    return F.silu(gate(x)) * up(x)


def make_case(lead, n, k, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = torch.randn(2 * n, k, generator=g, dtype=torch.float64) / k**0.5  # nn.Linear-like scale
    dy = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype), dy.to(device, dtype)


def truth_swiglu(x, w, dy, dtype=torch.float64):
    """Forward and grads (y, dx, dW) of separate nn.Linear gate/up layers, computed in `dtype`."""
    n, k = w.shape[0] // 2, w.shape[1]
    gate = nn.Linear(k, n, bias=False, dtype=dtype, device=x.device)
    up = nn.Linear(k, n, bias=False, dtype=dtype, device=x.device)
    with torch.no_grad():
        gate.weight.copy_(w[:n])
        up.weight.copy_(w[n:])
    xx = x.detach().to(dtype).requires_grad_()
    y = separate_swiglu(xx, gate, up)
    y.backward(dy.to(dtype))
    return y.detach(), xx.grad, torch.cat([gate.weight.grad, up.weight.grad])


def run_swiglu(x, w, dy, impl):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = linear_swiglu(x, w, impl=impl)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def truth_residual(x, w, r, dy, dtype=torch.float64):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype, device=x.device)
    with torch.no_grad():
        lin.weight.copy_(w)
    xx = x.detach().to(dtype).requires_grad_()
    rr = r.detach().to(dtype).requires_grad_()
    y = lin(xx) + rr
    y.backward(dy.to(dtype))
    return y.detach(), xx.grad, lin.weight.grad, rr.grad


def run_residual(x, w, r, dy, impl):
    x, w, r = (t.detach().clone().requires_grad_() for t in (x, w, r))
    y = linear_residual(x, w, r, impl=impl)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, r.grad


lead_dims = st.sampled_from([(1,), (3,), (2, 5), (1, 1), (17,), (2, 3, 4)])


# --------------------------------------------------------------------------- reference, fp64
@given(lead=lead_dims, n=st.integers(1, 33), k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_swiglu_reference_matches_separate_linears_fp64(lead, n, k, seed):
    x, w, dy = make_case(lead, n, k, torch.float64, seed)
    for got, want, name in zip(run_swiglu(x, w, dy, "reference"), truth_swiglu(x, w, dy),
                               ("y", "dx", "dw")):
        assert got.shape == want.shape, name
        assert_close(got, want, msg=name)


@given(lead=lead_dims, n=st.integers(1, 33), k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_residual_reference_matches_linear_plus_add_fp64(lead, n, k, seed):
    x, w, _ = make_case(lead, n, k, torch.float64, seed)
    r = torch.randn(*lead, 2 * n, dtype=torch.float64)
    dy = torch.randn(*lead, 2 * n, dtype=torch.float64)
    for got, want in zip(run_residual(x, w, r, dy, "reference"), truth_residual(x, w, r, dy)):
        assert_close(got, want)


@given(shape=st.sampled_from([(1,), (7, 3), (2, 4, 5)]), seed=st.integers(0, 2**16))
def test_hand_written_swiglu_derivative_matches_autograd(shape, seed):
    g = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    up = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    (F.silu(gate) * up).backward(dy)
    dg, du = swiglu_backward_reference(dy, gate.detach(), up.detach())
    assert_close(dg, gate.grad)
    assert_close(du, up.grad)


# --------------------------------------------------------------------------- Triton, interpreter
small_lead = st.sampled_from([(1,), (5,), (2, 3), (37,), (70,)])


@needs_triton
@given(lead=small_lead, n=st.integers(1, 40), k=st.integers(1, 72), seed=st.integers(0, 2**16))
def test_swiglu_triton_fp32_matches_fp64_truth(lead, n, k, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, dy = make_case(lead, n, k, torch.float32, seed, dev)
    got = run_swiglu(x, w, dy, "triton")
    bounds = swiglu_roundings(x, w, dy)
    for a, b, mag, name in zip(got, truth_swiglu(x, w, dy), bounds, ("y", "dx", "dw")):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert_within_roundings(a, b, mag.reshape(b.shape), dtype=torch.float32, name=name)


@needs_triton
@given(lead=small_lead, n=st.integers(1, 40), k=st.integers(1, 72), seed=st.integers(0, 2**16))
def test_residual_triton_fp32_matches_fp64_truth(lead, n, k, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, _ = make_case(lead, n, k, torch.float32, seed, dev)
    r = torch.randn(*lead, 2 * n, device=dev)
    dy = torch.randn(*lead, 2 * n, device=dev)
    bounds = linear_residual_roundings(x, w, r, dy)
    for a, b, mag, name in zip(run_residual(x, w, r, dy, "triton"), truth_residual(x, w, r, dy),
                               bounds, ("y", "dx", "dw", "dr")):
        assert_within_roundings(a, b, mag.reshape(b.shape), dtype=torch.float32, name=name)


def check_lowp(dtype, dev, lead, n, k, seed):
    """The low-precision rule against the fp32 truth from the same rounded inputs, with the
    separate nn.Linear layers in `dtype` as the one baseline; the gradients (sums of 2N or M
    products) relative to each element's Sigma|terms| (`gemm_magnitudes`), plus the kernels'
    fp32 accumulation of that many terms; y, not a sum after the activation, globally."""
    x, w, dy = make_case(lead, n, k, dtype, seed, dev)
    rows = x.numel() // k
    got = run_swiglu(x, w, dy, "triton")
    lowp = truth_swiglu(x, w, dy, dtype=dtype)  # separate nn.Linear in the same precision
    truth = truth_swiglu(x, w, dy, dtype=torch.float32)  # from the same rounded inputs
    mag = gemm_magnitudes("swiglu", x, w, dy)
    terms = {"dx": 2 * n, "dw": rows}
    for a, b, t, name in zip(got, lowp, truth, ("y", "dx", "dw")):
        assert a.dtype == dtype
        m = mag.get(name)
        assert_lowp_close(a, b, t, name=name, magnitude=None if m is None else m.reshape(t.shape),
                          reduction=terms.get(name, 0))
    r = torch.randn(*lead, 2 * n, device=dev).to(dtype)
    dy2 = dy.repeat_interleave(2, -1)
    got = run_residual(x, w, r, dy2, "triton")
    lowp = truth_residual(x, w, r, dy2, dtype=dtype)
    truth = truth_residual(x, w, r, dy2, dtype=torch.float32)
    mag = gemm_magnitudes("residual", x, w, dy2, r)
    terms = {"y": k + 1, "dx": 2 * n, "dw": rows, "dr": 0}
    for a, b, t, name in zip(got, lowp, truth, ("y", "dx", "dw", "dr")):
        assert_lowp_close(a, b, t, name="residual " + name, magnitude=mag[name].reshape(t.shape),
                          reduction=terms[name])


@needs_triton
@given(lead=small_lead, n=st.integers(1, 40), k=st.integers(1, 72), seed=st.integers(0, 2**16))
# dx of K = 1, N = 23 cancels to 1/10 of its terms: global maxima failed it (explore seed 300)
@example(lead=(1,), n=23, k=1, seed=777)
def test_triton_fp16_low_precision_rule(lead, n, k, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    check_lowp(torch.float16, dev, lead, n, k, seed)


@needs_triton
def test_triton_edge_shapes_and_layouts():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # M = 0: empty output, no launch
    x = torch.randn(0, 8, device=dev)
    w = torch.randn(6, 8, device=dev)
    assert linear_swiglu(x, w, impl="triton").shape == (0, 3)
    # non-contiguous x (a transposed view) and w (a column slice): strides go to the kernel
    xt = torch.randn(9, 13, device=dev).t()  # (13, 9), stride (1, 13)
    wt = torch.randn(10, 18, device=dev)[:, ::2]  # (10, 9), stride (18, 2)
    y = linear_swiglu(xt, wt, impl="triton")
    assert_close(y, truth_swiglu(xt, wt, torch.zeros(13, 5, device=dev))[0], dtype=torch.float32)
    r = torch.randn(13, 10, device=dev)
    assert_close(linear_residual(xt, wt, r, impl="triton"),
                 (xt.double() @ wt.double().t() + r.double()), dtype=torch.float32)


# --------------------------------------------------------------------------- dispatch and errors
def test_auto_on_cpu_is_reference_without_warning():
    x, w, _ = make_case((4,), 3, 5, torch.float32, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = linear_swiglu(x, w)  # impl="auto"
        z = linear_residual(x, w, torch.zeros(4, 6))
    assert_close(y, truth_swiglu(x, w, torch.zeros(4, 3))[0], dtype=torch.float32)
    assert_close(z, x.double() @ w.double().t(), dtype=torch.float32)


def test_triton_that_cannot_run_raises(monkeypatch):
    """An explicit impl='triton' that cannot run raises, naming the impls that can."""
    x, w, _ = make_case((4,), 3, 5, torch.float64, 0)
    with pytest.raises(TypeError, match="cannot run.*float64.*impl='torch' or impl='reference'"):
        linear_swiglu(x, w, impl="triton")  # fp64 has no kernel
    for impl in ("torch", "reference", "auto"):  # what can: the same unfused PyTorch code
        assert_close(linear_swiglu(x, w, impl=impl), truth_swiglu(x, w, torch.zeros(4, 3))[0])
    if not torch.cuda.is_available():  # CPU tensor without the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA tensor"):
            linear_residual(x.float(), w.float(), torch.zeros(4, 6), impl="triton")


@pytest.mark.parametrize("call, err, match", [
    (lambda: linear_swiglu(torch.randn(2, 4), torch.randn(5, 4)), ValueError, r"rows \(5\) must be even"),
    (lambda: linear_swiglu(torch.randn(2, 4), torch.randn(6, 3)), ValueError, r"K=4.*shape\[1\] \(3\)"),
    (lambda: linear_swiglu(torch.randn(2, 4), torch.randn(6)), ValueError, "must be 2-D"),
    (lambda: linear_swiglu(torch.randn(2, 4), torch.randn(6, 4).half()), TypeError, "dtype"),
    (lambda: linear_swiglu(torch.randn(2, 4), torch.randn(6, 4, device="meta")), ValueError, "meta"),
    (lambda: linear_swiglu(torch.randn(2, 4), torch.randn(6, 4), impl="cuda"), ValueError, "impl"),
    (lambda: linear_residual(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4)), ValueError,
     r"residual must have shape .*\(2, 3\)"),
    (lambda: linear_residual(torch.randn(2, 4), torch.randn(3, 4), torch.ones(2, 3, dtype=torch.int64)),
     TypeError, "residual must be a floating-point"),
    (lambda: linear_residual(torch.randn(2, 4), torch.randn(3, 4), [0.0]), TypeError, "tensors"),
    (lambda: linear_residual(torch.randn(2, 4), torch.randn(3, 5), torch.randn(2, 3)), ValueError,
     "K=4"),
])
def test_bad_inputs_raise_clear_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


# --------------------------------------------------------------------------- merged projections
@given(heads=st.sampled_from([(4, 4), (4, 2), (6, 1), (3, 3)]), d=st.integers(1, 9),
       k=st.integers(1, 24), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_merged_qkv_equals_separate_projections(heads, d, k, bias, seed):
    torch.manual_seed(seed)
    nh, nkv = heads  # GQA: K and V are narrower than Q
    q, kk, v = (nn.Linear(k, o, bias=bias, dtype=torch.float64) for o in (nh * d, nkv * d, nkv * d))
    merged = MergedLinear.from_separate([q, kk, v])
    assert merged.out_features == (nh * d, nkv * d, nkv * d)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    parts = merged.split(merged(x))
    for part, lin in zip(parts, (q, kk, v)):
        assert_close(part, lin(x))
    # gradients of the merged weight are the separate gradients, concatenated
    gs = [torch.randn_like(p) for p in parts]
    sum((p * g).sum() for p, g in zip(merged.forward_split(x), gs)).backward()
    sum((lin(x) * g).sum() for lin, g in zip((q, kk, v), gs)).backward()
    assert_close(merged.weight.grad, torch.cat([q.weight.grad, kk.weight.grad, v.weight.grad]))
    if bias:
        assert_close(merged.bias.grad, torch.cat([q.bias.grad, kk.bias.grad, v.bias.grad]))


def test_shard_takes_every_parts_slice():
    torch.manual_seed(0)
    lins = [nn.Linear(5, o, bias=True) for o in (8, 4, 4)]
    full = MergedLinear.from_separate(lins)
    for r in range(2):
        a, b = full.shard(r, 2), MergedLinear.from_separate(lins, tp_rank=r, tp_size=2)
        assert a.out_features == (4, 2, 2) and a.tp_rank == r
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert torch.equal(a.split(a.weight, dim=0)[1], lins[1].weight[2 * r:2 * r + 2])


def test_merged_linear_errors():
    with pytest.raises(ValueError, match=r"in_features \(4\)"):
        MergedLinear.from_separate([nn.Linear(3, 2), nn.Linear(4, 2)])
    with pytest.raises(ValueError, match=r"part 1 has 3 output rows.*tp_size \(2\)"):
        MergedLinear.from_separate([nn.Linear(3, 2), nn.Linear(3, 3)], tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="all linears have a bias"):
        MergedLinear.from_separate([nn.Linear(3, 2), nn.Linear(3, 2, bias=False)])
    with pytest.raises(ValueError, match=r"tp_rank \(2\)"):
        MergedLinear.from_separate([nn.Linear(3, 2)], tp_rank=2, tp_size=2)
    with pytest.raises(ValueError, match="of size 4"):
        MergedLinear(3, (2, 2)).split(torch.randn(5))


@pytest.mark.parametrize("impl", ["reference"] + (["triton"] if INTERPRET else []))
def test_swiglu_mlp_equals_separate_layers(impl):
    torch.manual_seed(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gate, up = nn.Linear(12, 20, bias=False, device=dev), nn.Linear(12, 20, bias=False, device=dev)
    down = nn.Linear(20, 12, bias=False, device=dev)
    mlp = SwiGLUMLP.from_separate(gate, up, down, impl=impl)
    x, res = torch.randn(3, 7, 12, device=dev), torch.randn(3, 7, 12, device=dev)
    assert_close(mlp(x), down(separate_swiglu(x, gate, up)), dtype=torch.float32)
    assert_close(mlp(x, res), down(separate_swiglu(x, gate, up)) + res, dtype=torch.float32)


@needs_triton
def test_triton_backward_with_broadcast_grad():
    # y.sum().backward() hands the backward an expanded dy with stride 0 in every dim
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, _ = make_case((6, 3), 10, 17, torch.float32, 5, dev)
    got = run_swiglu(x, w, torch.ones(6, 3, 10, device=dev).expand(6, 3, 10), "triton")
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    linear_swiglu(x1, w1, impl="triton").sum().backward()
    assert_close(x1.grad, got[1], dtype=torch.float32)
    assert_close(w1.grad, got[2], dtype=torch.float32)
    want = truth_swiglu(x, w, torch.ones(6, 3, 10, dtype=torch.float64, device=dev))
    assert_close(x1.grad, want[1], dtype=torch.float32)


@needs_triton
@given(m=st.integers(1, 70), n=st.integers(1, 40), k8=st.integers(1, 9), seed=st.integers(0, 99))
def test_tma_and_pointer_loads_agree(m, n, k8, seed):
    """The two tile loaders of the swiglu kernels (TMA descriptors / pointer grids)."""
    from haillm.fusedops.gemm.ops import _tma_ok, swiglu_bwd_triton, swiglu_fwd_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, dy = make_case((m,), n, 8 * k8, torch.float16, seed, dev)  # K % 8 == 0: TMA-able
    assert _tma_ok(x, w) or (dev == "cuda" and torch.cuda.get_device_capability()[0] < 9)
    y, truth = [swiglu_fwd_triton(x, w, tma=t) for t in (False, True)], truth_swiglu(x, w, dy)
    assert_lowp_close(y[1], y[0], truth[0], name="y tma vs pointer")
    dh = [swiglu_bwd_triton(x, w, dy, tma=t) for t in (False, True)]
    assert_close(dh[1], dh[0], dtype=torch.float16)
    x_odd, w_odd, _ = make_case((m,), n, 8 * k8 + 1, torch.float16, seed, dev)
    assert not _tma_ok(x_odd, w_odd)  # rows of 2K+2 bytes are not 16-byte aligned


@pytest.mark.parametrize("impl", ["reference"] + (["triton"] if INTERPRET else []))
def test_residual_in_fp32_with_half_operands(impl):
    """An fp32 residual stream with fp16 GEMM operands: the sum comes out in fp32 (as
    ``x @ W.T + r`` in PyTorch), rounded once from the fp32 accumulator; dr keeps fp32."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, _ = make_case((3, 5), 6, 24, torch.float16, 7, dev)
    r = torch.randn(3, 5, 12, device=dev, requires_grad=True)
    y = linear_residual(x, w, r, impl=impl)
    assert y.dtype == torch.float32
    truth = x.double() @ w.double().t() + r.detach().double()
    lowp = (x @ w.t()).float() + r.detach()  # PyTorch: fp16 GEMM, then the fp32 add
    assert_lowp_close(y.detach(), lowp, truth, name="y")
    y.backward(torch.ones_like(y))
    assert r.grad.dtype == torch.float32 and torch.equal(r.grad, torch.ones_like(r))


def test_autocast_casts_operands_like_nn_linear():
    x, w, _ = make_case((4,), 3, 8, torch.float32, 0)
    r = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_swiglu(x, w)
        z = linear_residual(x, w, r)
        want = F.silu(F.linear(x, w[:3])) * F.linear(x, w[3:])
    assert y.dtype == torch.bfloat16 and want.dtype == torch.bfloat16
    assert torch.equal(y, want)
    assert z.dtype == torch.float32  # bf16 product + fp32 residual
    assert_close(z, (x.bfloat16() @ w.bfloat16().t()).float() + r, dtype=torch.bfloat16)
