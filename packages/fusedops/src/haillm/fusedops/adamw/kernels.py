"""The AdamW Triton kernel: one pass over flat buffers (`@triton.jit` only).

Per element it reads param, grad, exp_avg, exp_avg_sq (16 bytes in fp32) and writes param,
exp_avg, exp_avg_sq (12 bytes), plus 2 bytes for the optional bf16/fp16 copy of the new param.
An unfused AdamW (one PyTorch op per line of the maths) moves several times that: every
intermediate goes to memory and back. Bandwidth is all that matters for an optimizer step.
"""

import triton
import triton.language as tl


@triton.jit
def adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr,
    n_elements,
    decay,          # 1 - lr * weight_decay          (host-computed, as torch does)
    beta1_c,        # 1 - beta1: the weight w of the lerp m <- lerp(m, g, w)
    beta2, beta2_c,  # beta2, 1 - beta2
    step_size,      # lr / (1 - beta1^step)
    bias2_sqrt,     # sqrt(1 - beta2^step)
    eps,
    HAS_COPY: tl.constexpr,
    LERP_SMALL: tl.constexpr,  # w < 0.5: torch's lerp takes the branch anchored at m
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    # Everything is computed in fp32 whatever the storage dtype (bf16 grads, fp16 copies...).
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)

    p = p * decay                               # decoupled weight decay (Loshchilov & Hutter)
    # torch's lerp and addcmul round once per fused multiply-add (its CPU kernels call
    # fmadd, its CUDA kernels are contracted by nvcc): written as explicit FMAs they round the
    # same way here, on the GPU and in the interpreter alike, so m and v equal torch's bits.
    if LERP_SMALL:
        m = tl.fma(beta1_c, g - m, m)           # lerp, w < 0.5:  m + w (g - m)
    else:
        m = tl.fma(beta1_c - 1.0, g - m, g)     # lerp, w >= 0.5: g - (1 - w) (g - m)
    v = tl.fma(beta2_c * g, g, v * beta2)      # addcmul: v * beta2 + (value * g) * g
    # Same grouping and IEEE-rounded sqrt/div as torch.optim.AdamW, so fp32 results agree
    # bit for bit or within an ulp: denom = sqrt(v) / sqrt(bias2) + eps.
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)     # addcdiv: p + (value * m) / denom

    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_COPY:
        # The ZeRO-1 path: the low-precision working copy is written in the same pass.
        tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=mask)
