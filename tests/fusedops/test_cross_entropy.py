"""inplace_cross_entropy against F.cross_entropy: loss, gradient, the in-place storage, hazards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from haillm.fusedops import cross_entropy_reference, inplace_cross_entropy
from haillm.fusedops.cross_entropy import ops as ce_mod
from tests.helpers import (
    assert_close,
    assert_lowp_close,
    assert_within_roundings,
    cross_entropy_roundings,
)


def _case(n, v, seed, dtype, n_ignore=0, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:n_ignore]] = -100
    return x.to(device), t.to(device)


def _truth(x, t, reduction, weight, **kw):
    """fp64 loss and dL/dx of sum(loss * weight) from the (rounded) input x."""
    xd = x.detach().double().requires_grad_()
    loss = cross_entropy_reference(xd, t, reduction=reduction, dtype=torch.float64, **kw)
    (loss * weight.double()).sum().backward()
    return loss.detach(), xd.grad


def _mine(x, t, reduction, weight, impl, **kw):
    """Run inplace_cross_entropy on a non-leaf copy; return (loss, input grad, logits after)."""
    leaf = x.detach().clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, as the output of an LM head
    loss = inplace_cross_entropy(logits, t, reduction=reduction, impl=impl, **kw)
    assert loss.dtype == torch.float32
    (loss * weight).sum().backward()
    return loss.detach(), leaf.grad, logits.detach()


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
@given(n=st.integers(1, 9), v=st.sampled_from([1, 2, 7, 64, 127, 300, 1500]),
       seed=st.integers(0, 2**16), n_ignore=st.integers(0, 3),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       label_smoothing=st.sampled_from([0.0, 0.1, 0.5]), z_loss=st.sampled_from([0.0, 1e-3, 0.1]))
def test_fp32_matches_reference(impl, n, v, seed, n_ignore, reduction, label_smoothing, z_loss):
    x, t = _case(n, v, seed, torch.float32, min(n_ignore, n - 1))
    w = torch.rand(n) + 0.5 if reduction == "none" else torch.tensor(1.3)
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    loss, grad, stored = _mine(x, t, reduction, w, impl, **kw)
    ref_loss, ref_grad = _truth(x, t, reduction, w, **kw)
    # element by element within the derived fp32 rounding bound (tests/helpers.py)
    mag_loss, mag_grad = cross_entropy_roundings(x, t, reduction, w, **kw)
    assert_within_roundings(loss, ref_loss, mag_loss, dtype=torch.float32, name="loss")
    assert_within_roundings(grad, ref_grad, mag_grad, dtype=torch.float32, name="grad")
    # the logits' storage holds dL/dlogits
    assert_within_roundings(stored, ref_grad, mag_grad, dtype=torch.float32, name="stored")
    if reduction != "none" and label_smoothing == 0.0 and z_loss == 0.0:  # straight F.ce
        want = (F.cross_entropy(x.double(), t) if reduction == "mean"
                else F.cross_entropy(x.double(), t, reduction="sum"))
        assert_within_roundings(loss, want, mag_loss, dtype=torch.float32, name="loss vs F.ce")


@pytest.mark.parametrize(("impl", "dtype"), [("torch", torch.float16), ("torch", torch.bfloat16),
                                             ("triton", torch.float16)])  # bf16 kernel: GPU
@given(n=st.integers(1, 6), v=st.sampled_from([5, 129, 700]), seed=st.integers(0, 2**16),
       label_smoothing=st.sampled_from([0.0, 0.1]))
def test_low_precision_rule(impl, dtype, n, v, seed, label_smoothing):
    x, t = _case(n, v, seed, dtype, scale=2.0)
    w = torch.tensor(1.0)
    loss, grad, _ = _mine(x, t, "mean", w, impl, label_smoothing=label_smoothing)
    ref_loss, ref_grad = _truth(x, t, "mean", w, label_smoothing=label_smoothing)
    # eager PyTorch in low precision: F.cross_entropy on the fp16/bf16 logits
    xl = x.clone().requires_grad_()
    torch_loss = F.cross_entropy(xl, t, label_smoothing=label_smoothing)
    torch_loss.backward()
    assert_lowp_close(grad, xl.grad, ref_grad, name="dlogits")
    assert_lowp_close(loss, torch_loss, ref_loss, name="loss")
    assert grad.dtype == dtype


def test_cpu_path_chunks_rows(monkeypatch):
    """Several row chunks (the CPU memory saving) give the same result as one."""
    monkeypatch.setattr(ce_mod, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk
    x, t = _case(10, 50, 0, torch.bfloat16, n_ignore=2)
    w = torch.tensor(1.0)
    loss, grad, _ = _mine(x, t, "mean", w, "torch", z_loss=1e-2)
    ref_loss, ref_grad = _truth(x, t, "mean", w, z_loss=1e-2)
    assert_close(loss, ref_loss, dtype=torch.float32)
    assert_lowp_close(grad, ref_grad.to(torch.bfloat16), ref_grad, name="dlogits bf16")


def test_shapes_views_and_no_grad():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (2, 3))
    t[0, 1] = -100
    ref = F.cross_entropy((h @ w.T).reshape(-1, 11), t.reshape(-1))
    gh, gw = torch.autograd.grad(ref, (h, w))
    for make in (lambda: h @ w.T, lambda: (h @ w.T).view(-1, 11)):  # (B, S, V) and a view
        logits = make()
        loss = inplace_cross_entropy(logits, t.reshape(logits.shape[:-1]))
        assert_close(loss, ref)
        dh, dw = torch.autograd.grad(loss, (h, w))
        assert_close(dh, gh)
        assert_close(dw, gw)
    # reduction="none" keeps the target's shape
    logits = h @ w.T
    loss = inplace_cross_entropy(logits, t, reduction="none")
    assert loss.shape == (2, 3)
    loss.sum().backward()
    # without grad the logits are left untouched
    with torch.no_grad():
        logits = h @ w.T
        before = logits.clone()
        inplace_cross_entropy(logits, t)
        assert torch.equal(logits, before)


def test_reusing_logits_raises():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (4,))
    # the storage holds the gradient after backward
    logits = h @ w.T
    expected = torch.autograd.grad(F.cross_entropy(logits, t), logits)[0]
    loss = inplace_cross_entropy(logits, t)
    loss.backward()
    assert_close(logits.detach(), expected)
    # a later graph that uses the logits raises (instead of using gradients as logits)
    with pytest.raises(RuntimeError, match="overwrote the logits"):
        (logits * 2).sum().backward()
    # ... also in the same backward as the loss, also through a view
    for view in (False, True):
        logits = h @ w.T
        lg = logits.view(4, 11) if view else logits
        loss = inplace_cross_entropy(lg, t)
        with pytest.raises(RuntimeError, match="overwrote the logits"):
            (loss + lg.square().sum()).backward()
    # a node that saved the logits before the loss (here a tanh soft-cap) raises in backward
    logits = torch.tanh(h @ w.T)
    loss = inplace_cross_entropy(logits, t)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_errors():
    x = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="target shape"):
        inplace_cross_entropy(x, t[:3])
    with pytest.raises(TypeError, match="target must be int64"):
        inplace_cross_entropy(x, t.float())
    with pytest.raises(TypeError, match="logits dtype"):
        inplace_cross_entropy(x.double(), t)
    with pytest.raises(ValueError, match="stride 1"):
        inplace_cross_entropy(torch.randn(10, 4).T, t)
    with pytest.raises(ValueError, match=r"target\[2\] = 10 is out of range \[0, 10\)"):
        inplace_cross_entropy(x, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="reduction"):
        inplace_cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="leaf"):
        inplace_cross_entropy(x.clone().requires_grad_(), t)
    with pytest.raises(ValueError, match="view of part"):
        inplace_cross_entropy((x.requires_grad_() * 1)[:, :5], t % 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernel(dtype):
    x, t = _case(257, 50_257, 0, dtype, n_ignore=5, device="cuda")
    w = torch.tensor(1.0, device="cuda")
    for kw in (dict(), dict(label_smoothing=0.1, z_loss=1e-4)):
        loss, grad, _ = _mine(x, t, "mean", w, "auto", **kw)
        ref_loss, ref_grad = _truth(x, t, "mean", w, **kw)
        xl = x.clone().requires_grad_()
        torch_loss = F.cross_entropy(xl.float(), t, label_smoothing=kw.get("label_smoothing", 0))
        mag_loss, _ = cross_entropy_roundings(x, t, "mean", w, **kw)  # (the GPU's approx exp)
        assert_within_roundings(loss, ref_loss, mag_loss, dtype=torch.float32, name="loss")
        if not kw:
            torch_loss.backward()
            assert_lowp_close(grad, xl.grad, ref_grad, name="dlogits")


# --- cases from the peers' own suites (Liger-Kernel test/transformers/test_cross_entropy.py)

@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_give_zero_gradients(impl, reduction):
    """An all-padding micro-batch: F.cross_entropy's loss ("mean": NaN = 0/0) and zero grads.

    The gradient must be 0, not 0 * (1/0) = NaN: even `nan_to_num(loss) + other_loss` would
    otherwise leave NaN in the shared weights.
    """
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    t = torch.full((5,), -100)
    ref = F.cross_entropy(h @ w.T, t, reduction=reduction)
    loss = inplace_cross_entropy(h @ w.T, t, reduction=reduction, impl=impl)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    other = (h @ w.T).square().mean()                 # another loss on the same weights
    gh, gw = torch.autograd.grad(other, (h, w), retain_graph=True)
    (torch.nan_to_num(loss).sum() + other).backward()
    assert torch.equal(h.grad, gh) and torch.equal(w.grad, gw)
    logits = h.detach() @ w.detach().T
    logits.requires_grad_()
    leaf_out = logits * 1
    inplace_cross_entropy(leaf_out, t, reduction=reduction, impl=impl).sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
@pytest.mark.parametrize("scalar", [1.0, 10.0, 100.0])
def test_large_logits_gradient_precision(impl, scalar):
    """Liger's `scalar` cases: logits x 10 and x 100, V = 32000, fp32.

    Against fp64, the gradient error is at most 2 x torch fp32's (F.cross_entropy) plus one
    ulp of the largest |gradient| (its own rounding). The softmax as exp(x - lse) gave ~130x
    (the rounding of lse, ~ ulp(400), becomes a relative error of every probability).
    """
    x, t = _case(4, 32000, int(scalar), torch.float32, n_ignore=1, scale=scalar)
    w = torch.tensor(1.0)
    loss, grad, _ = _mine(x, t, "mean", w, impl)
    ref_loss, ref_grad = _truth(x, t, "mean", w)
    xt = x.clone().requires_grad_()
    torch_loss = F.cross_entropy(xt, t)
    torch_loss.backward()
    assert_lowp_close(grad, xt.grad, ref_grad, floor=0.0, name="dlogits")
    assert_lowp_close(loss, torch_loss, ref_loss, floor=0.0, name="loss")
