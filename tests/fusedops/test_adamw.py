"""adamw_step_ and FusedAdamW against torch.optim.AdamW (exact maths in fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from haillm.fusedops import FusedAdamW, adamw_step_, adamw_step_reference_

HP = dict(lr=st.sampled_from([1e-3, 3e-2, 0.1]), beta1=st.sampled_from([0.9, 0.8]),
          beta2=st.sampled_from([0.999, 0.95]), eps=st.sampled_from([1e-8, 1e-6]),
          weight_decay=st.sampled_from([0.0, 0.01, 0.1]))


def _buffers(n, seed, gdtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g).to(gdtype)
    m = torch.randn(n, generator=g) * 0.1
    v = torch.rand(n, generator=g) * 0.01
    return [t.to(device) for t in (p, grad, m, v)]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@given(n=st.integers(1, 3000), step=st.integers(1, 50), seed=st.integers(0, 2**16),
       gdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       copy_dtype=st.sampled_from([None, torch.float16]), **HP)
def test_adamw_step_triton_matches_reference(n, step, seed, gdtype, copy_dtype, lr, beta1,
                                             beta2, eps, weight_decay):
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    ref = _buffers(n, seed, gdtype)
    out = [t.clone() for t in ref]
    cref = None if copy_dtype is None else torch.empty(n, dtype=copy_dtype)
    cout = None if copy_dtype is None else torch.empty(n, dtype=copy_dtype)
    adamw_step_reference_(*ref, param_copy=cref, **hp)
    adamw_step_(*out, param_copy=cout, impl="triton", **hp)
    for a, b in zip(out, ref):
        assert _rel(a, b) <= 1e-6
    if copy_dtype is not None:
        torch.testing.assert_close(cout, cref, atol=0, rtol=1e-3)  # rounding of equal fp32


@given(n=st.integers(1, 500), steps=st.integers(1, 6), seed=st.integers(0, 2**16), **HP)
def test_adamw_step_matches_torch_adamw(n, steps, seed, lr, beta1, beta2, eps, weight_decay):
    """Several steps of adamw_step_ (both impls) equal torch.optim.AdamW on one tensor."""
    p, grad, _, _ = _buffers(n, seed)
    tp = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([tp], lr=lr, betas=(beta1, beta2), eps=eps,
                            weight_decay=weight_decay, foreach=False)
    mine = {impl: [p.clone(), torch.zeros(n), torch.zeros(n)] for impl in ("torch", "triton")}
    for s in range(1, steps + 1):
        g = grad * (1.0 + 0.5 * s) - 0.1 * s
        tp.grad = g.clone()
        opt.step()
        for impl, (pp, m, v) in mine.items():
            adamw_step_(pp, g, m, v, step=s, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, impl=impl)
    for impl, (pp, m, v) in mine.items():
        assert _rel(pp, tp.detach()) <= 1e-6, impl
        assert _rel(m, opt.state[tp]["exp_avg"]) <= 1e-6, impl
        assert _rel(v, opt.state[tp]["exp_avg_sq"]) <= 1e-6, impl


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3),
                               torch.nn.LayerNorm(3))


def _groups(model, lrs=(1e-2, 3e-3), wds=(0.1, 0.0)):
    ps = list(model.parameters())
    return [dict(params=ps[:3], lr=lrs[0], weight_decay=wds[0]),
            dict(params=ps[3:], lr=lrs[1], weight_decay=wds[1])]


def _train(model, opt, steps, seed, skip=None):
    """Steps with gradients drawn from `seed` (identical for both optimizers whatever the
    parameters: a model-computed gradient would amplify last-ulp differences step after step)."""
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * (0.1 + s)
        if skip is not None and s % 2 == 1:  # this param gets no gradient on odd steps
            skip(model).grad = None
        opt.step()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@given(seed=st.integers(0, 2**10), steps=st.integers(1, 5), with_skip=st.booleans())
def test_fused_adamw_matches_torch_param_groups(impl, seed, steps, with_skip):
    ref_model = _model(seed)
    model = copy.deepcopy(ref_model)
    skip = (lambda m: m[2].bias) if with_skip else None
    ref = torch.optim.AdamW(_groups(ref_model), betas=(0.9, 0.99), foreach=False)
    opt = FusedAdamW(_groups(model), betas=(0.9, 0.99), impl=impl)
    _train(ref_model, ref, steps, seed, skip)
    _train(model, opt, steps, seed, skip)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-6
    for a, b in zip(model.parameters(), ref_model.parameters()):
        sa, sb = opt.state[a], ref.state[b]
        assert float(sa["step"]) == float(sb["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert sa[k].shape == sb[k].shape
            assert _rel(sa[k], sb[k]) <= 1e-6


def test_fused_adamw_one_launch_per_bucket(monkeypatch):
    """A bucket (group x device x dtype) is updated by a single adamw_step_ call on flat buffers."""
    import haillm.fusedops.adamw.optimizer as optmod

    calls = []
    real = optmod.adamw_step_
    monkeypatch.setattr(optmod, "adamw_step_", lambda p, *a, **k: (calls.append(p.numel()),
                                                                   real(p, *a, **k)))
    model = _model()
    opt = FusedAdamW(_groups(model))
    _train(model, opt, 1, 0)
    sizes = [sum(p.numel() for p in g["params"]) for g in opt.param_groups]
    assert calls == sizes
    # zero_grad(set_to_none=False): backward accumulates straight into the flat gradient buffer
    opt.zero_grad(set_to_none=False)
    model(torch.randn(2, 13)).sum().backward()
    b = next(iter(opt._buckets.values()))
    flat_g = next(iter(b.flat_g.values()))
    assert b.params[0].grad.untyped_storage().data_ptr() == flat_g.untyped_storage().data_ptr()


def test_state_dict_round_trip_with_torch():
    ref_model, model = _model(1), _model(1)
    ref = torch.optim.AdamW(_groups(ref_model), foreach=False)
    _train(ref_model, ref, 3, 7)
    # torch -> FusedAdamW: load the parameters and torch's optimizer state, continue both
    model.load_state_dict(ref_model.state_dict())
    opt = FusedAdamW(_groups(model))
    opt.load_state_dict(ref.state_dict())
    _train(ref_model, ref, 2, 8)
    _train(model, opt, 2, 8)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-6
    # FusedAdamW -> torch: same keys and shapes, torch continues identically
    sd = opt.state_dict()
    sd_ref = ref.state_dict()
    assert sd["state"].keys() == sd_ref["state"].keys()
    for k in sd["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert sd["state"][k][name].shape == sd_ref["state"][k][name].shape
    ref2_model = copy.deepcopy(model)
    ref2 = torch.optim.AdamW(_groups(ref2_model), foreach=False)
    ref2.load_state_dict(copy.deepcopy(sd))
    _train(ref2_model, ref2, 2, 9)
    _train(model, opt, 2, 9)
    for a, b in zip(model.parameters(), ref2_model.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-6


def test_errors():
    p = torch.zeros(8)
    with pytest.raises(ValueError, match="grad has 7 elements, expected 8"):
        adamw_step_(p, torch.zeros(7), torch.zeros(8), torch.zeros(8), step=1, lr=1e-3,
                    beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="step must be >= 1"):
        adamw_step_(p, p, torch.zeros(8), torch.zeros(8), step=0, lr=1e-3, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(TypeError, match="exp_avg dtype"):
        adamw_step_(p, p, torch.zeros(8, dtype=torch.int32), torch.zeros(8), step=1, lr=1e-3,
                    beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        adamw_step_(p, p, torch.zeros(8), torch.zeros(8), step=1, lr=1e-3, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.0, impl="cuda")
    with pytest.raises(ValueError, match="invalid betas"):
        FusedAdamW([torch.nn.Parameter(p)], betas=(0.9, 1.0))


@pytest.mark.gpu
def test_adamw_gpu_bf16_copy_and_large():
    n = 3_000_017
    ref = _buffers(n, 0, torch.bfloat16, "cuda")
    out = [t.clone() for t in ref]
    cref = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    cout = torch.empty_like(cref)
    hp = dict(step=3, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    adamw_step_reference_(*ref, param_copy=cref, **hp)
    adamw_step_(*out, param_copy=cout, impl="triton", **hp)
    for a, b in zip(out, ref):
        assert _rel(a, b) <= 1e-6
    torch.testing.assert_close(cout, out[0].to(torch.bfloat16), atol=0, rtol=0)  # same pass
    torch.testing.assert_close(cout, cref, atol=0, rtol=2**-8)  # fp32 last-bit differences
    # FusedAdamW on CUDA against torch's fused AdamW
    torch.manual_seed(0)
    m1 = torch.nn.Linear(257, 129).cuda()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = FusedAdamW(m2.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(8, 257, device="cuda")
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(m2.parameters(), m1.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-5
