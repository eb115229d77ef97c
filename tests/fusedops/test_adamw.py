"""adamw_step_ and FusedAdamW against torch.optim.AdamW (exact maths in fp32).

How close must they be? The kernel performs torch's operations in torch's order, with torch's
roundings: the lerp and addcmul as single-rounding FMAs (torch's CPU kernels call `fmadd`, its
CUDA kernels are contracted by nvcc), the sqrt and divisions IEEE-rounded. So `exp_avg` and
`exp_avg_sq` agree with torch bit for bit on this machine. The parameters need not: torch's
vectorised CPU `sqrt` (AVX2) is not correctly rounded (1 ulp off for ~18 % of inputs) while its
scalar tail and the kernel's are, so where the layouts differ (a flat buffer vs one tensor per
parameter) an element's denominator can differ by one ulp. The derived bound (`_Bound`): per
step, 1 ulp of sqrt plus one re-rounding of each of the 3 later ops of the update u (4 ulps of
|u|), one re-rounding of the decayed parameter and one of the new parameter (|p_new| <= |p d| +
|u|): |delta p| <= eps32 * sum_t (2 |p_{t-1} d| + 5 |u_t|), with eps32 = 2**-23. It is measured
against those magnitudes, not |p|: p = p d - u cancels when the update undoes the parameter.
For the moments the same per-step accounting (one rounding of each term) gives
eps32 * sum_t 2 (|m_{t-1}| + w |g_t - m_{t-1}|) and eps32 * sum_t 2 v_t: the bit-for-bit
agreement is what this machine shows, the bound what the maths allows everywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from haillm.fusedops import FusedAdamW, adamw_step_, adamw_step_reference_
from tests.helpers import assert_within_roundings

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


def _check_one_step(got, ref, before, hp):
    """One step of two implementations from the same `before` = (p, g, m, v): the bound of the
    module doc for t = 1."""
    p0, g, m0, _ = (t.double() for t in before)
    pd = p0 * (1.0 - hp["lr"] * hp["weight_decay"])
    w = 1.0 - hp["beta1"]
    mags = (2 * pd.abs() + 5 * (pd - ref[0].double()).abs(), None,
            2 * (m0.abs() + w * (g - m0).abs()), 2 * ref[3].double())
    for what, a, b, mag in zip(("param", "grad", "exp_avg", "exp_avg_sq"), got, ref, mags):
        if mag is None:
            assert torch.equal(a, b), "adamw_step_ must not write the gradient"
        else:
            assert_within_roundings(a, b, mag, name=what)


class _Bound:
    """Per-element error bounds of fp32 AdamW, accumulated from torch's own run (module doc).

    Call `before(params)` just before and `after(params)` just after each torch step.
    """

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt, self.mag, self._pre = opt, {}, {}

    def _hp(self):
        for group in self.opt.param_groups:
            for p in group["params"]:
                yield p, group

    def before(self):
        for p, group in self._hp():
            if p.grad is None:
                continue
            st = self.opt.state.get(p, {})
            m0 = st["exp_avg"].double() if "exp_avg" in st else torch.zeros_like(p, dtype=torch.float64)
            pd = p.detach().double() * (1.0 - group["lr"] * group["weight_decay"])
            self._pre[p] = (pd, m0, p.grad.double(), 1.0 - group["betas"][0])

    def after(self):
        for p, (pd, m0, g, w) in self._pre.items():
            st = self.opt.state[p]
            u = (pd - p.detach().double()).abs()
            inc = (2 * pd.abs() + 5 * u, 2 * (m0.abs() + w * (g - m0).abs()),
                   2 * st["exp_avg_sq"].double())
            old = self.mag.get(p, (0.0, 0.0, 0.0))
            self.mag[p] = tuple(a + b for a, b in zip(old, inc))
        self._pre = {}

    def check(self, ref_param, got_p, got_m, got_v, name=""):
        """got_* (fp32) against torch's param / exp_avg / exp_avg_sq of `ref_param`."""
        st = self.opt.state[ref_param]
        for what, got, want, mag in zip(("param", "exp_avg", "exp_avg_sq"), (got_p, got_m, got_v),
                                        (ref_param.detach(), st["exp_avg"], st["exp_avg_sq"]),
                                        self.mag[ref_param]):
            assert_within_roundings(got, want, mag, name=f"{name} {what}")


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
    before = [t.clone() for t in ref]
    adamw_step_reference_(*ref, param_copy=cref, **hp)
    adamw_step_(*out, param_copy=cout, impl="triton", **hp)
    _check_one_step(out, ref, before, hp)
    if copy_dtype is not None:  # the copy is each implementation's own new p, rounded once
        assert torch.equal(cout, out[0].to(copy_dtype)) and torch.equal(cref, ref[0].to(copy_dtype))


@given(n=st.integers(1, 500), steps=st.integers(1, 6), seed=st.integers(0, 2**16), **HP)
def test_adamw_step_matches_torch_adamw(n, steps, seed, lr, beta1, beta2, eps, weight_decay):
    """Several steps of adamw_step_ (both impls) equal torch.optim.AdamW on one tensor."""
    p, grad, _, _ = _buffers(n, seed)
    tp = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([tp], lr=lr, betas=(beta1, beta2), eps=eps,
                            weight_decay=weight_decay, foreach=False)
    bound = _Bound(opt)
    mine = {impl: [p.clone(), torch.zeros(n), torch.zeros(n)] for impl in ("torch", "triton")}
    for s in range(1, steps + 1):
        g = grad * (1.0 + 0.5 * s) - 0.1 * s
        tp.grad = g.clone()
        bound.before()
        opt.step()
        bound.after()
        for impl, (pp, m, v) in mine.items():
            adamw_step_(pp, g, m, v, step=s, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, impl=impl)
    for impl, (pp, m, v) in mine.items():
        bound.check(tp, pp, m, v, name=impl)
    # the PyTorch path is torch's own single-tensor arithmetic: identical bits
    pp, m, v = mine["torch"]
    assert torch.equal(pp, tp.detach()) and torch.equal(m, opt.state[tp]["exp_avg"])


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3),
                               torch.nn.LayerNorm(3))


def _groups(model, lrs=(1e-2, 3e-3), wds=(0.1, 0.0)):
    ps = list(model.parameters())
    return [dict(params=ps[:3], lr=lrs[0], weight_decay=wds[0]),
            dict(params=ps[3:], lr=lrs[1], weight_decay=wds[1])]


def _train(model, opt, steps, seed, skip=None, bound=None):
    """Steps with gradients drawn from `seed` (identical for both optimizers whatever the
    parameters: a model-computed gradient would amplify last-ulp differences step after step).
    `bound`: a `_Bound` of this (torch) optimizer, accumulated step by step."""
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=g) * (0.1 + s)).to(p.device)
        if skip is not None and s % 2 == 1:  # this param gets no gradient on odd steps
            skip(model).grad = None
        if bound is not None:
            bound.before()
        opt.step()
        if bound is not None:
            bound.after()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@given(seed=st.integers(0, 2**10), steps=st.integers(1, 5), with_skip=st.booleans())
def test_fused_adamw_matches_torch_param_groups(impl, seed, steps, with_skip):
    ref_model = _model(seed)
    model = copy.deepcopy(ref_model)
    skip = (lambda m: m[2].bias) if with_skip else None
    ref = torch.optim.AdamW(_groups(ref_model), betas=(0.9, 0.99), foreach=False)
    opt = FusedAdamW(_groups(model), betas=(0.9, 0.99), impl=impl)
    bound = _Bound(ref)
    _train(ref_model, ref, steps, seed, skip, bound)
    _train(model, opt, steps, seed, skip)
    for i, (a, b) in enumerate(zip(model.parameters(), ref_model.parameters())):
        sa, sb = opt.state[a], ref.state[b]
        assert float(sa["step"]) == float(sb["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert sa[k].shape == sb[k].shape
        bound.check(b, a.detach(), sa["exp_avg"], sa["exp_avg_sq"], name=f"param {i}")


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
    bound = _Bound(ref)
    _train(ref_model, ref, 2, 8, bound=bound)
    _train(model, opt, 2, 8)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        bound.check(b, a.detach(), opt.state[a]["exp_avg"], opt.state[a]["exp_avg_sq"])
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
    bound = _Bound(ref2)
    _train(ref2_model, ref2, 2, 9, bound=bound)
    _train(model, opt, 2, 9)
    for a, b in zip(model.parameters(), ref2_model.parameters()):
        bound.check(b, a.detach(), opt.state[a]["exp_avg"], opt.state[a]["exp_avg_sq"])


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
    before = [t.clone() for t in ref]
    adamw_step_reference_(*ref, param_copy=cref, **hp)
    adamw_step_(*out, param_copy=cout, impl="triton", **hp)
    _check_one_step(out, ref, before, hp)
    # each copy is its own implementation's new p, rounded once (p itself: _check_one_step)
    assert torch.equal(cout, out[0].to(torch.bfloat16)) and torch.equal(cref, ref[0].to(torch.bfloat16))
    # FusedAdamW (the Triton kernel) on CUDA against torch's CUDA AdamW, the same gradients
    # for both, per element within the module doc's bound
    ref_model = torch.nn.Linear(257, 129).cuda()
    model = copy.deepcopy(ref_model)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    bound = _Bound(ref)
    _train(ref_model, ref, 3, 0, bound=bound)
    _train(model, opt, 3, 0)
    for i, (a, b) in enumerate(zip(model.parameters(), ref_model.parameters())):
        bound.check(b, a.detach(), opt.state[a]["exp_avg"], opt.state[a]["exp_avg_sq"],
                    name=f"CUDA param {i}")


@pytest.mark.parametrize("beta1", [0.9, 0.3])  # both branches of torch's lerp
def test_moments_are_torch_bits(beta1):
    """m and v are computed with torch's exact roundings (FMA lerp and addcmul): equal bits,
    over a vectorised body and a scalar tail, whatever the implementation."""
    p, grad, _, _ = _buffers(4099, 3)
    tp = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([tp], lr=1e-2, betas=(beta1, 0.95), foreach=False)
    pp, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    for s in range(1, 4):
        g = grad * s - 0.3
        tp.grad = g.clone()
        opt.step()
        adamw_step_(pp, g, m, v, step=s, lr=1e-2, beta1=beta1, beta2=0.95, eps=1e-8,
                    weight_decay=1e-2, impl="triton")
    assert torch.equal(m, opt.state[tp]["exp_avg"])
    assert torch.equal(v, opt.state[tp]["exp_avg_sq"])
