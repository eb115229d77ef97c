"""Helpers shared by the test suite: one tolerance table, the low-precision rule, ranks.

Tolerances (used by every package's tests; change them here, nowhere else):

| dtype    | atol  | rtol  | used for                                                     |
|----------|-------|-------|--------------------------------------------------------------|
| float64  | 1e-9  | 1e-7  | optimized path vs reference, both in float64                 |
| float32  | 1e-5  | 1e-5  | both in float32 (reductions reordered)                       |
| float16  | 2e-3  | 2e-3  | direct comparison of half-precision outputs (rarely: prefer the rule) |
| bfloat16 | 2e-2  | 2e-2  | likewise                                                     |

For float16/bfloat16 (and fp32 kernels checked against fp64) the spec is the *low-precision
rule*: the error of the kernel against the truth must be at most 2 x the error of ONE named
same-precision PyTorch path against the same truth (`assert_lowp_close`), measured relative to
each element's magnitude (the sum of the absolute values of its terms) where that is known,
plus a floor of a few roundings of that magnitude: on tiny problems, or a cancelling sum whose
true value is 0, the PyTorch path can be exact by luck.

Where the number of roundings is known exactly (AdamW, elementwise ops), the bound is direct:
`assert_within_roundings(actual, expected, magnitude)`, |actual - expected| <= eps * magnitude
element by element. fp32 kernels against the fp64 formula on the same rounded inputs use the
derived per-element bounds below (first-order forward error analysis, each rounding taken at
the magnitude of what it rounds, sums by `sum_rounding`, row conditioning included):

| bound                       | for                                                          |
|-----------------------------|--------------------------------------------------------------|
| `norm_roundings`            | LayerNorm / RMSNorm + residual, fwd and bwd (kappa = max|h| rstd) |
| `cross_entropy_roundings`   | cross-entropy with label smoothing, z-loss, reductions       |
| `swiglu_roundings`          | silu(x Wg^T) * (x Wu^T), dx, dW                              |
| `linear_residual_roundings` | x W^T + r, dx, dW, dr                                        |
| `norm_rtol(n, dtype)`       | two 2-norms of the same n values, summed in two orders       |
| `adamw_exact`               | one fp32 AdamW step against its exact (fp64) result           |
| `gemm_magnitudes`           | Sigma|terms| of the fused GEMMs' outputs, for the rule in fp16/bf16 |

Optimizer runs are compared one step at a time from the same state (tests/zero/lockstep.py):
each step's gradient against the same per-rank micro-batch gradients (bit-identical: the same
parameters at the same memory offsets), which data parallelism only adds in another order
(`sum_rounding(dp)`), then each step's p, m, v against `adamw_exact` of the gradient it used. Comparing whole runs instead would need a bound
on how Adam's m / sqrt(v) amplifies a gradient difference from step to step, which grows
without limit where |g| ~ eps (the normalised update then divides rounding noise by itself).
"""

from __future__ import annotations

import math

import torch

from haillm.parallel.testing import RankFailure, free_port, run_distributed

__all__ = [
    "PLAN_RTOL",
    "RUN_RTOL",
    "RUN_WEIGHT_ATOL",
    "TOL",
    "RankFailure",
    "assert_close",
    "assert_lowp_close",
    "adamw_exact",
    "assert_within_roundings",
    "cross_entropy_roundings",
    "free_port",
    "gemm_magnitudes",
    "linear_residual_roundings",
    "norm_roundings",
    "norm_rtol",
    "run_distributed",
    "sum_rounding",
    "swiglu_roundings",
    "tol",
]

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


# Two fp32 training runs of the same model that differ only in the order of their reductions
# (another layout, a resharded resume) agree per step, in loss and gradient norm, within this
# relative bound: the spec of the composition (issue 15). Per step, a reordered sum of n terms
# moves by at most sum_rounding(n) eps32 of its Sigma|terms| (~3e-6 for the n ~ 1e4 terms of
# the micro model's gradient sums), and the handful of steps these tests run let Adam amplify
# that by the update's sensitivity to its gradient (O(10) for the normalised m / sqrt(v)).
RUN_RTOL = 1e-4
# The same, for weights after such runs: RUN_RTOL of the largest weight (|w| <= 2 here).
RUN_WEIGHT_ATOL = 2 * RUN_RTOL
# The memory planner against the measured peak: the spec (issues 16, 17): within 15 %.
PLAN_RTOL = 0.15


def tol(dtype: torch.dtype) -> dict[str, float]:
    """`atol`/`rtol` for comparing two results computed in `dtype`."""
    return TOL[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, msg: str = "") -> None:
    """`torch.testing.assert_close` with the table's tolerance for `dtype` (default: expected's)."""
    t = tol(dtype or expected.dtype)
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, atol=t["atol"], rtol=t["rtol"],
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def sum_rounding(n: int) -> float:
    """Error of an n-term sum computed in any order, relative to Sigma |terms|, in units of the
    accumulator's eps (= 2u): the worst case (n - 1) u (Higham, Accuracy and Stability of
    Numerical Algorithms, 2002, eq. 4.4), or for long sums the probabilistic bound 8 sqrt(n) u,
    exceeded with probability < 2n exp(-32) (Higham & Mary, SIAM J. Sci. Comput. 2019):
    whichever is smaller."""
    if n <= 1:
        return 0.0
    return min((n - 1) / 2, 4 * math.sqrt(n))


def norm_rtol(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative difference of two 2-norms of the same n values, each accumulated in `dtype`
    in any order: each side's Sigma g^2 is off by sum_rounding(n) eps + u (the squares) of
    itself (all terms are positive: no cancellation), which the square root halves, plus u for
    the square root and up to 2u where a norm is formed per tensor and squared again:
    (sum_rounding(n) + 3) eps(dtype) for the two together (the values themselves must be the
    same bits; fp32 values squared in float64 are even exact)."""
    return (sum_rounding(n) + 3) * torch.finfo(dtype).eps


def _normalised(err: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """err / magnitude per element; an element with magnitude 0 must be exact (else inf)."""
    mag = magnitude.double().expand_as(err)
    return torch.where(mag > 0, err / mag.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.where(err > 0, torch.inf, 0.0))


def assert_lowp_close(
    kernel: torch.Tensor,
    baseline: torch.Tensor,
    truth: torch.Tensor,
    *,
    magnitude: torch.Tensor | None = None,
    roundings: float = 1.0,
    reduction: int = 0,
    factor: float = 2.0,
    floor: float = 1e-6,
    name: str = "output",
) -> None:
    """The low-precision rule: the kernel's error is at most `factor` x the error of ONE named
    same-precision PyTorch path (`baseline`), both against `truth` (fp64, or fp32, from the same
    rounded inputs), plus a floor.

    With `magnitude` (fp64, the Sigma |terms| of each element: what its sums add up, in absolute
    value) errors are measured relative to it, element by element, so rows of different
    conditioning are each held to their own scale:
        max |kernel - truth| / magnitude <= factor * max |baseline - truth| / magnitude
                                            + roundings * eps(dtype)
                                            + sum_rounding(reduction) * eps(float32).
    The floor is what the kernel may lose where the baseline happens to be exact (tiny problems,
    a cancelling sum whose true value is 0): `roundings` roundings in the output's dtype along
    the chain of the computation, plus the reordered fp32 accumulation of its sums (at most
    `reduction` terms summed in a row: both FA-2 and the GEMM kernels accumulate in fp32);
    plus the output's own rounding where it is subnormal (an absolute spacing, eps x the
    smallest normal). An element whose magnitude is 0 must be exact.

    Without `magnitude` (outputs that are not sums, or whose terms are not known) the global
    maxima are compared: max|kernel - truth| <= factor * max|baseline - truth| + floor, the floor
    at least eps(dtype) x max|truth| in any dtype: the rounding of the output itself to its
    dtype (half an ulp of it) and of the last operation before it (the other half), which the
    kernel pays where the baseline happens to be exact.
    """
    if not isinstance(baseline, torch.Tensor):
        raise TypeError("assert_lowp_close: one named baseline (a tensor), not several")
    dtype = baseline.dtype
    truth = truth.double()
    err_k = (kernel.double() - truth).abs()
    err_b = (baseline.double() - truth).abs()
    if magnitude is not None:
        # An element whose true value lies in the dtype's subnormal range is rounded with the
        # absolute spacing of that range (fp16: 2**-24), not eps * |value|: that much is the
        # output's own rounding, whatever the arithmetic before it.
        sub = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
        mag = magnitude.double().expand_as(err_k)
        err_k = torch.where(mag > 0, (err_k - sub).clamp_min(0.0), err_k)
        rk, rb = _normalised(err_k, magnitude), _normalised(err_b, magnitude)
        allowed = (factor * rb.max().item() + roundings * torch.finfo(dtype).eps
                   + sum_rounding(reduction) * torch.finfo(torch.float32).eps)
        assert rk.max().item() <= allowed, (
            f"{name}: kernel error {rk.max().item():.3e} x magnitude > {factor} x {dtype} "
            f"baseline error {rb.max().item():.3e} x magnitude + {roundings} eps "
            f"(worst element {int(rk.argmax())}: |err| {err_k.reshape(-1)[int(rk.argmax())]:.3e})"
        )
        return
    floor = max(floor, torch.finfo(dtype).eps * truth.abs().max().item())
    ek, eb = err_k.max().item(), err_b.max().item()
    assert ek <= factor * eb + floor, (
        f"{name}: kernel error {ek:.3e} > {factor} x PyTorch {dtype} error "
        f"{eb:.3e} (+{floor:.3g}), both against the truth"
    )


def assert_within_roundings(actual: torch.Tensor, expected: torch.Tensor,
                            magnitude: torch.Tensor, *, dtype: torch.dtype | None = None,
                            name: str = "output") -> None:
    """Element by element: |actual - expected| <= eps(dtype) * magnitude.

    `magnitude` (fp64, broadcastable) is the derived bound in units of the dtype's machine
    epsilon: the sum, over every rounding an element's value went through, of the magnitude of
    what was rounded (Sigma |terms| of a sum, times how many roundings may differ). A cancelling
    sum that is exactly 0 thus still gets the floor its terms allow; an element whose terms are
    all 0 must match exactly. `dtype` defaults to `expected`'s.
    """
    eps = torch.finfo(dtype or expected.dtype).eps
    err = (actual.double() - expected.double()).abs()
    allowed = eps * magnitude.double().expand_as(err)
    bad = err > allowed
    if bad.any():
        i = int((err - allowed).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements exceed their rounding bound; "
            f"worst at flat index {i}: |{actual.reshape(-1)[i].item():.9g} - "
            f"{expected.reshape(-1)[i].item():.9g}| = {err.reshape(-1)[i].item():.3e} > "
            f"eps * magnitude = {allowed.reshape(-1)[i].item():.3e}"
        )


def norm_roundings(kind: str, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
                   r: torch.Tensor | None, dy: torch.Tensor, dh: torch.Tensor | None,
                   eps: float) -> dict[str, torch.Tensor]:
    """Derived rounding bound of LayerNorm / RMSNorm (+ residual add), forward and backward,
    element by element, in units of the arithmetic's eps (for `assert_within_roundings`).

    Inputs are the exactly representable values both paths see (fp64 copies of the rounded
    inputs); the truth is the formula in fp64 on them. Returns magnitudes for y, h (residual),
    dx (= d residual), dw, db. u = eps / 2 is the unit roundoff; every piece below is a first-
    order forward error bound, written for the worse of the two computations under test:
    the centred one of the Triton kernel ((h - mean) rstd, c1 = mean(xhat w dy)) and the
    uncentred one of ATen's CPU layer_norm (y = (h rstd - mean rstd) w + b; dx = rstd w dy +
    b' h + c with b' = (mean Sigma w dy - Sigma w dy h) rstd^3 / N; Welford moments).
    Divisions and square roots are counted at 2 ulp (2 eps: the GPU's div.full.f32 and
    sqrt.approx.f32 when the kernel is compiled; IEEE gives 1/2), other operations at u.

    Per row (n = N, s = sum_rounding(n), M = max|h|, mean mu, c = h - mu, var v = mean(c^2),
    rstd r = (v + eps)^-1/2, xhat = c r, kappa = M r: the condition number of centring):

      mean     D   = (s + 4) M            Sigma h (s), / n (2), the residual's rounding of each
                                          h (1/2); a Welford pass costs <= ((n+1)/4 + 2) M
                                          (3 roundings a step, damped by 1 - 1/k; merges +3/2),
                                          within (s + 4) M for the n <= 256 tested
      centred  E_i = D + |h_i| + |mu|     the mean's error, h's own rounding, and the subtraction
                                          (centred form) or the two products h r, mu r (ATen)
      variance dV  = 2 mean(|c| E) + mean(E^2) eps + (s + 3) mean((|c| + E eps)^2)
                                          the centred errors through c^2 (the E^2 term is the
                                          n dmu^2 of a near-constant row), square (1/2), sum
                                          (s), / n (2);
                                          Welford's M2 has the same n kappa u order (Chan,
                                          Golub & LeVeque 1983)
      rstd     dr  = dV / (2 (v + eps)) + 9/2      relative: + eps and eps's own rounding
                                          (halved: 1/2), sqrt (2), reciprocal (2); the
                                          variance's error is halved,
                                          amplified by v / (v + eps) <= 1: a near-constant row
                                          (v << eps) is saved by eps, a big one by v
      xhat     X_i = r E_i + |xhat_i| (dr + 1)     (d r, ATen's extra add)
      y        Y_i = |w_i| X_i + (|xhat_i w_i| + 2 |y_i|) / 2    (* w, + b, y's own rounding)

    So a row whose values are nearly equal has X ~ (s + 4) kappa eps with kappa up to
    max|h| / sqrt(eps): the (5, 2) LayerNorm row of seed 107 (kappa = 138) is that case.
    RMSNorm: mu = 0, D = 0, kappa = M r <= sqrt(n).

    Backward, g = w dy (1/2 each), c1 = mean(xhat g), c2 = mean(g) (RMSNorm: 0):
      dc1  = mean(X |g|) + (s + 3) mean(|xhat g|) + r (D mean|g| + (s + 3) mean(|h g|))
             (g's rounding 1/2, the product 1/2, the sum s, / N 2)
             the centred sum (Triton) or ATen's uncentred mean Sigma g - Sigma g h with mu's
             error (RMSNorm's autograd chain: Sigma g h, r^3 likewise)
      dc2  = (s + 3) mean|g|
      t_i  = g_i - xhat_i c1 - c2:  dT_i = |g_i| / 2 + X_i |c1| + |xhat_i| dc1 + dc2
                                           + 3/2 (|g_i| + |xhat_i c1| + |c2|)
      dx_i = r t_i (+ dh_i):        r dT_i + r |t_i| (dr + 1/2) + |dx_i|   (+ dh, own rounding)
    and over the m rows of a column (any order: s_m = sum_rounding(m)):
      dw_j = Sigma dy xhat:         Sigma |dy| X + (s_m + 1) Sigma |dy xhat|   (product, cast)
      db_j = Sigma dy:              (s_m + 1/2) Sigma |dy|

    Second-order terms are O((eps s kappa)^2) relative; the bound asserts eps (s + 4) kappa
    <= 1e-2, where they are below 1 % of it.
    """
    f64 = torch.float64
    ep = torch.finfo(torch.float32).eps
    h = x.to(f64) if r is None else x.to(f64) + r.to(f64)
    n, m = h.shape[-1], h.reshape(-1, h.shape[-1]).shape[0]
    s, s_m = sum_rounding(n), sum_rounding(m)
    w = torch.ones(n, dtype=f64) if w is None else w.to(f64)
    b = torch.zeros(n, dtype=f64) if b is None else b.to(f64)
    dy = dy.to(f64)
    big = h.abs().amax(-1, keepdim=True)
    if kind == "layer":
        mu = h.mean(-1, keepdim=True)
        d = (s + 4) * big
    else:
        mu = torch.zeros_like(big)
        d = torch.zeros_like(big)
    c = h - mu
    v = c.square().mean(-1, keepdim=True)
    rs = (v + eps).rsqrt()
    xhat = c * rs
    kappa = big * rs
    assert (ep * (s + 4) * kappa).max().item() <= 1e-2, "norm_roundings: beyond first order"
    e = d + h.abs() + mu.abs()
    dv = (2 * (c.abs() * e).mean(-1, keepdim=True) + ep * e.square().mean(-1, keepdim=True)
          + (s + 3) * (c.abs() + ep * e).square().mean(-1, keepdim=True))
    dr = dv / (2 * (v + eps)) + 4.5
    xe = rs * e + xhat.abs() * (dr + 1)
    y = xhat * w + b
    out = dict(y=w.abs() * xe + (xhat * w).abs() / 2 + y.abs())
    if r is not None:
        out["h"] = h.abs() / 2
    g = w * dy
    c1 = (xhat * g).mean(-1, keepdim=True)
    c2 = g.mean(-1, keepdim=True) if kind == "layer" else torch.zeros_like(c1)
    dc1 = ((xe * g.abs()).mean(-1, keepdim=True) + (s + 3) * (xhat * g).abs().mean(-1, keepdim=True)
           + rs * (d * g.abs().mean(-1, keepdim=True)
                   + (s + 3) * (h * g).abs().mean(-1, keepdim=True)))
    dc2 = (s + 3) * g.abs().mean(-1, keepdim=True)
    t = g - xhat * c1 - c2
    dt = (g.abs() / 2 + xe * c1.abs() + xhat.abs() * dc1 + dc2
          + 1.5 * (g.abs() + (xhat * c1).abs() + c2.abs()))
    dx = rs * t + (0 if dh is None else dh.to(f64))
    out["dx"] = rs * dt + rs * t.abs() * (dr + 0.5) + dx.abs()
    out["dw"] = ((dy.abs() * xe).reshape(-1, n).sum(0)
                 + (s_m + 1) * (dy * xhat).abs().reshape(-1, n).sum(0))
    out["db"] = (s_m + 0.5) * dy.abs().reshape(-1, n).sum(0)
    return out


def cross_entropy_roundings(x: torch.Tensor, target: torch.Tensor, reduction: str,
                            weight: torch.Tensor, *, label_smoothing: float = 0.0,
                            z_loss: float = 0.0, ignore_index: int = -100,
                            block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Derived fp32 rounding bound of cross-entropy (label smoothing eps_ls, z-loss z), in units
    of eps32 for `assert_within_roundings`: (loss, dL/dx of sum(loss * weight)).

    x: the (N, V) logits as both paths see them; the truth is the formula in fp64 on them. The
    bound covers the three computations under test: online softmax over column blocks of
    `block` (Triton: m, s = Sigma exp(x - m), rescaled by exp(m - m_new) per block), the
    PyTorch path (exp(x - m) / s, lse = m + log s) and F.cross_entropy + autograd (log_softmax:
    logp = x - m - log s; its backward g - p Sigma g). u = eps / 2; exp, log and divisions are
    counted at 2 ulp (2 eps: the GPU's ex2.approx.f32, whose argument x log2(e) is rounded
    first (another u |x|), lg2.approx.f32 (2^-22 absolute near 1) and div.full.f32; CPU libm
    and IEEE do better), the other operations at u. Per row, with p = softmax(x), m = max x,
    s_V = sum_rounding(V), B = ceil(V / block) blocks:

      sum      ds = s_V + 2 + Sigma_j p_j |x_j - m| + B (5/2 + max|x - m|)
               relative: the positive sum (no cancellation), each term's x - m (u |x - m|)
               and exp (2 eps + u |x - m|), and per block the rescale's subtraction, exp and
               product
      lse      dL = ds + |log s| + 2 + |lse| / 2     log (relative and absolute), m + log s
      loss     (1 + 2 z |lse|) dL + eps_ls (s_V + 2) (mean|x| + mean|x - m| + |log s|)
               + 2 (|lse| + |x_t| + eps_ls mean|x| + z lse^2)
               the label-smoothing mean (of x, or of logp for F.cross_entropy), and at most
               four roundings along the chain of each term (the products, the subtractions)
      p_j      dP_j = dL + |x_j - m| + |logp_j| / 2 + 4     relative (x - m, exp, / s;
               or logp's rounding, exp)
      grad_j   |w / n| (|c| p_j dP_j + p_j (2 z dL + 3/2 |c| + s_V + 1)
                        + 3/2 (|c| p_j + eps_ls / V + (1 - eps_ls) [j = t])) + 3 |grad_j|
               c = 1 + 2 z lse; s_V + 1: autograd's Sigma g of the log-softmax backward;
               the final scale by w (1/2) and 1 / n (2, and its product 1/2)
    reduction: "sum" adds s_N Sigma |loss_i| (N rows), "mean" that and 2 |mean| for the
    division. Ignored rows are exact zeros (their bound is 0).
    """
    f64 = torch.float64
    x = x.to(f64)
    n, v = x.shape
    valid = target != ignore_index
    s_v = sum_rounding(v)
    nb = -(-v // block)
    m = x.amax(-1, keepdim=True)
    xm = x - m
    ex = xm.exp()
    ssum = ex.sum(-1, keepdim=True)
    p, logs = ex / ssum, ssum.log()
    lse = m + logs
    logp = xm - logs
    ds = (s_v + 2 + (p * xm.abs()).sum(-1, keepdim=True)
          + nb * (2.5 + xm.abs().amax(-1, keepdim=True)))
    dl = ds + logs.abs() + 2 + lse.abs() / 2
    ts = torch.where(valid, target, 0).long().unsqueeze(1)
    x_t = x.gather(1, ts)
    ls, z = label_smoothing, z_loss
    mean_abs = x.abs().mean(-1, keepdim=True)
    loss = ((1 + 2 * z * lse.abs()) * dl
            + ls * (s_v + 2) * (mean_abs + xm.abs().mean(-1, keepdim=True) + logs.abs())
            + 2 * (lse.abs() + x_t.abs() + ls * mean_abs + z * lse.square()))
    loss = torch.where(valid.unsqueeze(1), loss, 0.0).squeeze(1)
    c = 1 + 2 * z * lse
    dp = dl + xm.abs() + logp.abs() / 2 + 4
    onehot = torch.zeros_like(x).scatter_(1, ts, 1.0)
    g = c * p - ls / v - (1 - ls) * onehot
    nv = max(int(valid.sum()), 1)
    scale = weight.to(f64).reshape(-1, 1) if reduction == "none" else weight.to(f64).reshape(1, 1)
    scale = scale / nv if reduction == "mean" else scale
    grad = (scale.abs() * (c.abs() * p * dp + p * (2 * z * dl + 1.5 * c.abs() + s_v + 1)
                           + 1.5 * (c.abs() * p + ls / v + (1 - ls) * onehot))
            + 3 * (scale * g).abs())
    grad = torch.where(valid.unsqueeze(1), grad, 0.0)
    if reduction == "none":
        return loss, grad
    # the true per-row losses, for the sum's rounding
    true_loss = ((1 - ls) * (lse - x_t) + ls * (lse - x.mean(-1, keepdim=True))
                 + z * lse.square()).squeeze(1)
    true_loss = torch.where(valid, true_loss, 0.0)
    total = loss.sum() + sum_rounding(n) * true_loss.abs().sum()
    if reduction == "mean":
        total = total / nv + 2 * (true_loss.sum() / nv).abs()
    return total, grad


def _matmul_err(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """(sum_rounding(k) + 1/2) eps32 x |a| @ |b|: a k-term fp32 dot product in any order (the
    products' rounding, u each, and the sum's), for a, b the exact operands."""
    return (sum_rounding(k) + 0.5) * torch.finfo(torch.float32).eps * (a.abs() @ b.abs())


def linear_residual_roundings(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor,
                              dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Derived fp32 rounding bound of y = x W^T + r and its gradients, in units of eps32 (for
    `assert_within_roundings`): y: the K-term dot product (`_matmul_err`) + the add (u |y|);
    dx = dy W: the 2N-term one; dW = dy^T x: the M-term one (M rows); dr = dy: exact."""
    f64, ep = torch.float64, torch.finfo(torch.float32).eps
    x, w, r, dy = (t.to(f64).reshape(-1, t.shape[-1]) for t in (x, w, r, dy))
    y = x @ w.T + r
    out_y = _matmul_err(x, w.T, x.shape[1]) + ep / 2 * y.abs()
    out_dx = _matmul_err(dy, w, dy.shape[1])
    out_dw = _matmul_err(dy.T, x, x.shape[0])
    return out_y / ep, out_dx / ep, out_dw / ep, torch.zeros_like(dy)


def swiglu_roundings(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Derived fp32 rounding bound of y = silu(x Wg^T) * (x Wu^T) (W = [Wg; Wu]) and of dx, dW
    (dy given), in units of eps32 for `assert_within_roundings`. First order, each rounding
    taken at the magnitude of what it rounds (u = eps / 2; exp and division to 2 ulp):

      g, u   dg0, du0 = the K-term dot products (`_matmul_err`)
      s      sigmoid = 1 / (1 + exp(-g)): ds = s (1 - s) dg0 + eps s (9/2 + (1 - s) |g| / 2)
             exp(-g) to 2 eps + u |g| (the GPU's ex2.approx of a rounded g log2 e), seen
             through 1 / (1 + e) as (1 - s) of it, the add (u), the division (2 eps)
      silu   g s:        dsilu = s dg0 + |g| ds + u |silu|
      y      silu * u:   |u| dsilu + |silu| du0 + u |y|
      dU     dy g s:     |dy| dsilu + eps |dU|                            (two products)
      q      1 + g (1 - s): dq = |g| (ds + u (1 - s)) + (1 - s) dg0 + u (|g (1 - s)| + |q|)
                         (the sigmoid's absolute error, not 1 - s, bounds 1 - s when s ~ 1)
      dG     dy u s q:   |dy| (du0 s |q| + |u| ds |q| + |u| s dq) + 3/2 eps |dG|
      dx     [dG, dU] W: the 2N-term dot product + the propagated dG, dU errors
      dW     [dG, dU]^T x: the M-term one (M rows) + the propagated errors
    """
    f64, ep = torch.float64, torch.finfo(torch.float32).eps
    x, dy = x.to(f64).reshape(-1, x.shape[-1]), dy.to(f64).reshape(-1, dy.shape[-1])
    w = w.to(f64)
    n, k = w.shape[0] // 2, w.shape[1]
    wg, wu = w[:n], w[n:]
    g, up = x @ wg.T, x @ wu.T
    dg0, du0 = _matmul_err(x, wg.T, k), _matmul_err(x, wu.T, k)
    s = torch.sigmoid(g)
    ds = s * (1 - s) * dg0 + ep * s * (4.5 + (1 - s) * g.abs() / 2)
    silu = g * s
    dsilu = s * dg0 + g.abs() * ds + ep / 2 * silu.abs()
    y = silu * up
    e_y = up.abs() * dsilu + silu.abs() * du0 + ep / 2 * y.abs()
    d_up = dy * silu
    e_dup = dy.abs() * dsilu + ep * d_up.abs()
    q = 1 + g * (1 - s)
    dq = (g.abs() * (ds + ep / 2 * (1 - s)) + (1 - s) * dg0
          + ep / 2 * ((g * (1 - s)).abs() + q.abs()))
    d_g = dy * up * s * q
    e_dg = dy.abs() * (du0 * s * q.abs() + up.abs() * ds * q.abs() + up.abs() * s * dq) \
        + 1.5 * ep * d_g.abs()
    dh, e_dh = torch.cat([d_g, d_up], -1), torch.cat([e_dg, e_dup], -1)
    e_dx = _matmul_err(dh, w, 2 * n) + e_dh @ w.abs()
    e_dw = _matmul_err(dh.T, x, x.shape[0]) + e_dh.T @ x.abs()
    return e_y / ep, e_dx / ep, e_dw / ep


def adamw_exact(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                step: int, lr, beta1, beta2, eps, weight_decay
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """One AdamW step (`torch.optim.AdamW`'s formula) in float64 from the fp32 state before it
    (p, m, v: (n,)) and the gradient g (n,); hyper-parameters are floats or (n,) tensors.

    Returns ``((p_new, m_new, v_new), (mag_p, mag_m, mag_v))``: the exact results and how far
    ONE fp32 implementation of the step (any order of the same operations; FMA or not) may be
    from them, in units of eps32 for `assert_within_roundings`. First order, each rounding
    taken at the magnitude of what it rounds (u = eps32 / 2), the fp32 scalars included:

      m = lerp(m0, g, w), w = 1 - beta1: the difference g - m0, the product, the sum and w
          itself: u (|m| + 3 w |g - m0|) <= 2 (|m0| + w |g - m0|) eps (either lerp branch);
      v = beta2 v0 + (1 - beta2) g^2: the products, the scalars, the sum (all terms >= 0):
          4 u v = 2 v eps;
      p = p0 d - s m / (sqrt(v / c2) + eps), d = 1 - lr wd, s = lr / c1: the decayed p0
          (product + scalar: 2u |p0 d|) and the new p (u (|p0 d| + |up|)); the update `up`
          through its roundings (sqrt to 1 ulp: 2u, the division by sqrt(c2) and that scalar,
          + eps, m / denom, s and the product with it: 6u, v's 4u seen through sqrt: 2u) and
          m's own error seen through s / denom (u |up| + 3u s w |g - m0| / denom): in all
          2 |p0 d| + 6 |up| + 2 s w |g - m0| / denom (in eps).

    An implementation that rounds the same step in another way (the Triton kernel, a flat
    buffer) is within this of the exact result; two of them are within the sum of theirs.
    """
    f64 = torch.float64
    p, m, v, g = (t.to(f64) for t in (p, m, v, g))
    as64 = (lambda x: x.to(f64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=f64))
    lr, beta1, beta2, eps, wd = (as64(x) for x in (lr, beta1, beta2, eps, weight_decay))
    w = 1.0 - beta1
    pd = p * (1.0 - lr * wd)
    m_new = m + w * (g - m)
    v_new = beta2 * v + (1.0 - beta2) * g * g
    c1, c2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    denom = (v_new / c2).sqrt() + eps
    up = (lr / c1) * m_new / denom
    p_new = pd - up
    mag_m = 2 * (m.abs() + w * (g - m).abs())
    mag_v = 2 * v_new
    mag_p = 2 * pd.abs() + 6 * up.abs() + 2 * (lr / c1) * w * (g - m).abs() / denom
    return (p_new, m_new, v_new), (mag_p, mag_m, mag_v)


def gemm_magnitudes(kind: str, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor,
                    r: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sigma|terms| of each element of the fused GEMMs' sums (float64, from the exact
    operands): the magnitudes for the low-precision rule (`assert_lowp_close(magnitude=...)`).

    kind "swiglu" (y = silu(x Wg^T) * (x Wu^T)): dx = dh W and dW = dh^T x with
    dh = [dG, dU] = [dy u s (1 + g (1 - s)), dy silu(g)]: |dh| @ |W| and |dh|^T @ |x|;
    kind "residual" (y = x W^T + r): y |x| @ |W|^T + |r|, dx |dy| @ |W|, dW |dy|^T @ |x|,
    dr |dy|. Keys: the outputs that are such sums.
    """
    f64 = torch.float64
    x, dy, w = (t.to(f64).reshape(-1, t.shape[-1]) for t in (x, dy, w))
    if kind == "swiglu":
        n = w.shape[0] // 2
        g, up = x @ w[:n].T, x @ w[n:].T
        s = torch.sigmoid(g)
        dh = torch.cat([dy * up * s * (1 + g * (1 - s)), dy * g * s], -1).abs()
        return {"dx": dh @ w.abs(), "dw": dh.T @ x.abs()}
    r = r.to(f64).reshape(-1, r.shape[-1])
    return {"y": x.abs() @ w.abs().T + r.abs(), "dx": dy.abs() @ w.abs(),
            "dw": dy.abs().T @ x.abs(), "dr": dy.abs()}

