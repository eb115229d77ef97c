"""Launchers and the autograd Function of the Triton LayerNorm/RMSNorm."""

from __future__ import annotations

import torch

from haillm.fusedops._dispatch import interpreting, next_pow2, num_programs_hint

# Largest column block that stays in registers on sm_90 with 16 warps (checked with ptxas -v:
# no spills). The backward holds ~2x more live row vectors (h, dy, w, dw, db, ...) than the
# forward. Longer rows loop over column blocks.
MAX_BLOCK_FWD = 16384
MAX_BLOCK_BWD = 8192


def _block(n: int, block_n: int | None, max_block: int) -> tuple[int, bool]:
    """Column block size and whether the whole row fits in it."""
    if block_n is None:
        block_n = 4096 if interpreting() else max_block  # the interpreter: moderate blocks
    block = min(next_pow2(n), next_pow2(block_n))
    return block, n <= block


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def norm_fwd(x2, weight, bias, residual2, eps, is_rms, block_n=None):
    """x2, residual2: (M, N) with unit column stride. Returns y, h (or None), mean, rstd."""
    from haillm.fusedops.norm.kernels import norm_fwd_kernel

    M, N = x2.shape
    y = torch.empty_like(x2)
    h = None
    if residual2 is not None:
        h = torch.empty(M, N, dtype=torch.promote_types(x2.dtype, residual2.dtype),
                        device=x2.device)
    mean = torch.empty(M, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    block, single = _block(N, block_n, MAX_BLOCK_FWD)
    if M > 0:
        norm_fwd_kernel[(M,)](
            x2, residual2 if residual2 is not None else x2,
            weight if weight is not None else x2, bias if bias is not None else x2,
            y, h if h is not None else y, mean, rstd,
            x2.stride(0), residual2.stride(0) if residual2 is not None else 0, y.stride(0),
            h.stride(0) if h is not None else 0,
            N, float(eps),
            IS_RMS=is_rms, HAS_RES=residual2 is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, SINGLE=single, BLOCK=block, num_warps=_warps(block),
        )
    return y, h, mean, rstd


def norm_bwd(dy2, h2, weight, bias, mean, rstd, dh_in2, dx_dtype, is_rms, block_n=None):
    """Returns dx (M, N) in dx_dtype, dw, db (fp32 reductions cast to the params' dtypes)."""
    from haillm.fusedops.norm.kernels import norm_bwd_kernel

    M, N = h2.shape
    dx = torch.empty(M, N, dtype=dx_dtype, device=h2.device)
    block, single = _block(N, block_n, MAX_BLOCK_BWD)
    programs = max(1, min(M, num_programs_hint(h2.device)))
    rows = -(-M // programs)
    programs = -(-M // rows) if M else 1
    # Partial sums: one row per program, zero-initialised (the multi-block path accumulates).
    alloc = torch.zeros if not single else torch.empty
    dw_part = alloc(programs, N, dtype=torch.float32, device=h2.device) if weight is not None \
        else None
    db_part = alloc(programs, N, dtype=torch.float32, device=h2.device) if bias is not None \
        else None
    if M > 0:
        norm_bwd_kernel[(programs,)](
            dy2, h2, weight if weight is not None else h2, mean, rstd,
            dh_in2 if dh_in2 is not None else dy2, dx,
            dw_part if dw_part is not None else rstd, db_part if db_part is not None else rstd,
            dy2.stride(0), h2.stride(0), dh_in2.stride(0) if dh_in2 is not None else 0,
            dx.stride(0), M, N, rows,
            IS_RMS=is_rms, HAS_DH_IN=dh_in2 is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, SINGLE=single, BLOCK=block, num_warps=_warps(block),
        )
    # The second reduction over programs (no atomics anywhere: deterministic).
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    if M == 0:
        dw = torch.zeros_like(weight) if weight is not None else None
        db = torch.zeros_like(bias) if bias is not None else None
    return dx, dw, db


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class NormFn(torch.autograd.Function):
    """Triton LayerNorm/RMSNorm with optional fused residual add; outputs y or (y, h)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms, block_n):
        x2 = _rows(x)
        r2 = _rows(residual) if residual is not None else None
        y, h, mean, rstd = norm_fwd(x2, weight, bias, r2, eps, is_rms, block_n)
        ctx.save_for_backward(h if h is not None else x2, weight, bias, mean, rstd)
        ctx.is_rms, ctx.block_n, ctx.shape = is_rms, block_n, x.shape
        ctx.x_dtype = x.dtype
        ctx.r_dtype = residual.dtype if residual is not None else None
        y = y.view(x.shape)
        if residual is None:
            return y
        return y, h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        h2, weight, bias, mean, rstd = ctx.saved_tensors
        has_res = ctx.r_dtype is not None
        dh_dtype = h2.dtype if has_res else ctx.x_dtype
        dx, dw, db = norm_bwd(
            _rows(dy), h2, weight, bias, mean, rstd,
            _rows(dh_in) if (has_res and dh_in is not None) else None,
            dh_dtype, ctx.is_rms, ctx.block_n)
        dx = dx.view(ctx.shape)
        dres = dx.to(ctx.r_dtype) if has_res and ctx.needs_input_grad[3] else None
        return (dx.to(ctx.x_dtype), dw if ctx.needs_input_grad[1] else None,
                db if ctx.needs_input_grad[2] else None, dres, None, None, None)
