"""LayerNorm / RMSNorm Triton kernels, forward and backward (`@triton.jit` only).

A norm is memory-bound: per row it reads N inputs and writes N outputs and does a handful of
flops per element. Unfused PyTorch (add, mean, sub, pow, mean, rsqrt, mul, mul, add) moves the
row through memory ~10 times; these kernels move it once (plus a re-read from L2 when the row
is too long for one block). Statistics are fp32 whatever the input dtype.

`SINGLE=True`: the row fits one block, it stays in registers. `SINGLE=False`: the row is walked
in column blocks: pass 1 computes the statistics (chunked Welford for LayerNorm: numerically
stable, unlike E[x^2] - E[x]^2), pass 2 normalises.
"""

import triton
import triton.language as tl


@triton.jit
def _load_row(X, R, H, row, stride_x, stride_r, stride_h, offs, mask, HAS_RES: tl.constexpr):
    """Columns `offs` of row x (+ r) in fp32. With the fused residual add of a pre-norm block,
    h = x + r is stored (the new residual stream) and returned *as stored* (rounded to its
    dtype), so it is normalised exactly as unfused code would."""
    h = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h_st = h.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + offs, h_st, mask=mask)
        h = h_st.to(tl.float32)
    return h


@triton.jit
def _affine(y, W, B, offs, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """y * w + b over columns `offs` (each optional)."""
    if HAS_W:
        y = y * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _dx(wdy, xhat, c1, c2, rstd, DH_IN, r64, stride_dhin, offs, mask, IS_RMS: tl.constexpr,
        HAS_DH_IN: tl.constexpr):
    """dx = rstd (w dy - xhat c1 - c2), c1 = mean(xhat w dy), c2 = mean(w dy) (0 for RMSNorm),
    plus the gradient flowing into the returned residual stream h = x + r."""
    if IS_RMS:
        dx = (wdy - xhat * c1) * rstd
    else:
        dx = (wdy - (xhat * c1 + c2)) * rstd
    if HAS_DH_IN:
        dx += tl.load(DH_IN + r64 * stride_dhin + offs, mask=mask, other=0.0).to(tl.float32)
    return dx


@triton.jit
def _bwd_cols(H, DY, W, r64, stride_h, stride_dy, offs, mask, mean, rstd, HAS_W: tl.constexpr):
    """Columns `offs` of row r64 for the looped backward: xhat, dy and w * dy, all fp32."""
    h = tl.load(H + r64 * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    return xhat, dy, wdy


@triton.jit
def norm_fwd_kernel(
    X, R, W, B, Y, H, Mean, Rstd,
    stride_x, stride_r, stride_y, stride_h,
    N, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < N
        h = _load_row(X, R, H, row, stride_x, stride_r, stride_h, cols, mask, HAS_RES)
        if IS_RMS:
            mean = 0.0
            var = tl.sum(h * h, axis=0) / N
        else:
            mean = tl.sum(h, axis=0) / N
            d = tl.where(mask, h - mean, 0.0)
            var = tl.sum(d * d, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = _affine((h - mean) * rstd, W, B, cols, mask, HAS_W, HAS_B)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # ---- pass 1: statistics over column blocks (and the residual sum, stored)
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            h = _load_row(X, R, H, row, stride_x, stride_r, stride_h, offs, mask, HAS_RES)
            if IS_RMS:
                m2 += tl.sum(h * h, axis=0)
            else:
                # Chan et al.'s parallel Welford: merge this block's (count, mean, M2).
                n_b = tl.sum(mask.to(tl.float32), axis=0)
                mean_b = tl.sum(h, axis=0) / n_b
                d = tl.where(mask, h - mean_b, 0.0)
                m2_b = tl.sum(d * d, axis=0)
                delta = mean_b - mean
                tot = cnt + n_b
                mean += delta * n_b / tot
                m2 += m2_b + delta * delta * cnt * n_b / tot
                cnt = tot
        var = m2 / N
        rstd = 1.0 / tl.sqrt(var + eps)
        # ---- pass 2: normalise (the row is re-read, mostly from L2)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            if HAS_RES:
                h = tl.load(H + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
            y = _affine((h - mean) * rstd, W, B, offs, mask, HAS_W, HAS_B)
            tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def norm_bwd_kernel(
    DY, H, W, Mean, Rstd, DH_IN, DX, DW_part, DB_part,
    stride_dy, stride_h, stride_dhin, stride_dx,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DH_IN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK: tl.constexpr,
):
    """dx = rstd * (w dy - xhat * mean(xhat w dy) - mean(w dy))   (RMSNorm: no last term).

    Each program owns `rows_per_program` consecutive rows and ONE row of the (programs, N) fp32
    partial-sum buffers for dw = sum_rows dy * xhat and db = sum_rows dy: no atomics, and a
    second (tiny) reduction over programs happens afterwards.
    """
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 row index: no 2^31 overflow
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK)
    part = pid.to(tl.int64) * N
    if SINGLE:
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], tl.float32)
        db_acc = tl.zeros([BLOCK], tl.float32)
        for r64 in range(row_start, row_end):
            h = tl.load(H + r64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + r64)
            if IS_RMS:
                xhat = h * rstd
            else:
                xhat = tl.where(mask, (h - tl.load(Mean + r64)) * rstd, 0.0)
            wdy = dy
            if HAS_W:
                wdy = dy * w
            c1 = tl.sum(xhat * wdy, axis=0) / N
            c2 = 0.0
            if not IS_RMS:
                c2 = tl.sum(wdy, axis=0) / N
            dx = _dx(wdy, xhat, c1, c2, rstd, DH_IN, r64, stride_dhin, cols, mask, IS_RMS,
                     HAS_DH_IN)
            tl.store(DX + r64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        if HAS_W:
            tl.store(DW_part + part + cols, dw_acc, mask=mask)
        if HAS_B:
            tl.store(DB_part + part + cols, db_acc, mask=mask)
    else:
        for r64 in range(row_start, row_end):
            rstd = tl.load(Rstd + r64)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(Mean + r64)
            # pass a: the two row reductions
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK):
                offs = start + cols
                mask = offs < N
                xhat, dy, wdy = _bwd_cols(H, DY, W, r64, stride_h, stride_dy, offs, mask, mean,
                                          rstd, HAS_W)
                c1 += tl.sum(xhat * wdy, axis=0)
                c2 += tl.sum(wdy, axis=0)
            c1 = c1 / N
            c2 = c2 / N
            # pass b: dx, and this program's partial dw/db (its own row of the buffer)
            for start in range(0, N, BLOCK):
                offs = start + cols
                mask = offs < N
                xhat, dy, wdy = _bwd_cols(H, DY, W, r64, stride_h, stride_dy, offs, mask, mean,
                                          rstd, HAS_W)
                dx = _dx(wdy, xhat, c1, c2, rstd, DH_IN, r64, stride_dhin, offs, mask, IS_RMS,
                         HAS_DH_IN)
                tl.store(DX + r64 * stride_dx + offs, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_W:
                    acc = tl.load(DW_part + part + offs, mask=mask, other=0.0)
                    tl.store(DW_part + part + offs, acc + dy * xhat, mask=mask)
                if HAS_B:
                    acc = tl.load(DB_part + part + offs, mask=mask, other=0.0)
                    tl.store(DB_part + part + offs, acc + dy, mask=mask)
