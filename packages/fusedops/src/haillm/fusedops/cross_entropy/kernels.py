"""The in-place cross-entropy Triton kernel (`@triton.jit` only).

One program per row (token). It walks the vocabulary in blocks twice:

1. online softmax statistics: running max `m` and running `s = sum exp(x - m)` in fp32, plus
   the plain sum of the logits (for label smoothing) -> logsumexp `lse = m + log(s)`;
2. the gradient `dL/dx_j = scale * (softmax_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == t])`
   written in the logits' dtype *over the logits*, with `softmax_j = exp(x_j - m) / s`.
   Not `exp(x_j - lse)`: `x_j - m` is exact in fp32, while `x_j - lse` carries the rounding of
   `lse` (~ ulp(|lse|)), a relative error of every probability that grows with the logits'
   magnitude (Liger-Kernel's "scalar" cases: logits x 100 gave 130x torch's gradient error).

So the kernel reads the row twice and writes it once, and allocates nothing of size N x V:
the (N, V) fp32 softmax and its gradient that eager PyTorch materialises never exist.
"""

import triton
import triton.language as tl


@triton.jit
def cross_entropy_fwd_bwd_kernel(
    logits_ptr, stride_row,     # (N, V) logits, overwritten by the gradient
    target_ptr,                 # (N,) int64
    loss_ptr,                   # (N,) fp32 per-row loss
    n_valid_ptr,                # () fp32: number of non-ignored targets (for reduction="mean")
    V,
    ignore_index,
    label_smoothing,            # eps
    z_loss,                     # z: adds z * lse^2 to each row's loss
    MEAN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    t = tl.load(target_ptr + row)
    cols = tl.arange(0, BLOCK)

    if t == ignore_index:
        # Ignored token: zero loss, zero gradient (F.cross_entropy semantics).
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                offs = start + cols
                tl.store(ptr + offs, tl.zeros([BLOCK], tl.float32).to(ptr.dtype.element_ty),
                         mask=offs < V)
        return

    # ---- pass 1: online max / sum-exp in fp32 (Milakov & Gimelshein, "Online softmax")
    m = float("-inf")
    s = 0.0
    sum_x = 0.0
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        x = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    x_t = tl.load(ptr + t).to(tl.float32)

    # loss = (1 - eps) (lse - x_t) + eps (lse - mean_j x_j) + z lse^2
    loss = lse - (1.0 - label_smoothing) * x_t - label_smoothing * sum_x / V + z_loss * lse * lse
    tl.store(loss_ptr + row, loss)

    # ---- pass 2: the gradient, over the logits
    if WRITE_GRAD:
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.load(n_valid_ptr)
        p_scale = 1.0 + 2.0 * z_loss * lse      # d(z lse^2)/dx_j = 2 z lse softmax_j
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - m) / s               # not exp(x - lse): see the module docstring
            g = p * p_scale - label_smoothing / V
            g = tl.where(offs == t, g - (1.0 - label_smoothing), g)
            tl.store(ptr + offs, (g * scale).to(ptr.dtype.element_ty), mask=mask)
