"""Triton kernels: tiled GEMMs whose epilogue does the element-wise work (only ``@triton.jit``).

One program computes one (BLOCK_M, BLOCK_N) tile of the output. It walks K in BLOCK_K steps,
loading an x tile (BLOCK_M, BLOCK_K) and weight tile(s) (BLOCK_K, BLOCK_N) and accumulating
``tl.dot`` products in fp32 registers. The *epilogue* is what happens to the accumulator
before it is stored: here silu(gate) * up (SwiGLU), its derivative, or "+ residual". The
fusion is that the accumulators never go to memory: a plain GEMM would write them, and the
next element-wise kernel would read them back.

Tails: with pointer loads, rows past M (or N) wrap around (``% M``) so every load is in
bounds without a mask (those rows are computed and then not stored); the K tail is masked
with zeros, which add nothing to the dot product. With TMA descriptors (the swiglu kernels on
Hopper) the copy engine zero-fills out-of-bounds reads itself. The store is masked on M and N.

Launch grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``; program ids are "grouped" along M
(GROUP_M rows of tiles share each weight tile while it is in L2), as in Triton's matmul
tutorial.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to a (pid_m, pid_n) tile, grouped along M for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: ask for true fp32 products (the default would be TF32 on NVIDIA GPUs,
    # 10-bit mantissa, which does not match torch's fp32 matmul).
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dual_gemm_tile(x, w, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, pid_m, pid_n,
                    IEEE: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Both accumulators of one tile: (x @ W_gate.T, x @ W_up.T), each (BLOCK_M, BLOCK_N) fp32.

    ``w`` is w_gate_up (2N, K): gate rows are [0, N), up rows [N, 2N). The x tile is loaded
    once per K step and used by both dots: the merged GEMM reads x once.

    Two ways to load tiles, same arithmetic:
    * ``TMA=False``: ``x`` and ``w`` are pointers; we build (BLOCK, BLOCK_K) pointer grids.
    * ``TMA=True`` (Hopper, 16-bit, 16-byte-aligned rows): ``x`` and ``w`` are tensor
      descriptors and each tile is one bulk copy by the TMA engine, which zero-fills reads
      out of bounds. A gate tile that runs past row N reads up rows: those columns are
      garbage but never stored (the store is masked on n < N).
    """
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            xt = x.load([off_m, k * BLOCK_K])  # (BLOCK_M, BLOCK_K)
            wg = w.load([off_n, k * BLOCK_K])  # (BLOCK_N, BLOCK_K)
            wu = w.load([N + off_n, k * BLOCK_K])
            acc_g = _dot(xt, wg.T, acc_g, IEEE)
            acc_u = _dot(xt, wu.T, acc_u, IEEE)
    else:
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # wrapped: loads in bounds
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        # Weight tiles are loaded transposed, (BLOCK_K, BLOCK_N), so the dot is x @ W.T.
        wg_ptrs = w + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
        wu_ptrs = wg_ptrs + N * stride_wn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wg = tl.load(wg_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            wu = tl.load(wu_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc_g = _dot(xt, wg, acc_g, IEEE)
            acc_u = _dot(xt, wu, acc_u, IEEE)
            x_ptrs += BLOCK_K * stride_xk
            wg_ptrs += BLOCK_K * stride_wk
            wu_ptrs += BLOCK_K * stride_wk
    return acc_g, acc_u


@triton.jit
def linear_swiglu_fwd_kernel(x, w, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn,
                             stride_wk, stride_ym, stride_yn, IEEE: tl.constexpr,
                             TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y (M, N) = silu(x @ W_gate.T) * (x @ W_up.T); x (M, K), w_gate_up (2N, K)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    g, u = _dual_gemm_tile(x, w, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                           pid_m, pid_n, IEEE, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    # Epilogue in fp32 registers: the only tensor written is y.
    y = g * tl.sigmoid(g) * u
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def linear_swiglu_bwd_kernel(x, w, dy_ptr, dh_ptr, M, N, K, stride_xm, stride_xk,
                             stride_wn, stride_wk, stride_dym, stride_dyn, stride_dhm,
                             stride_dhn, IEEE: tl.constexpr, TMA: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dh (M, 2N) = [dL/dgate, dL/dup], recomputing gate and up from x and w_gate_up.

    Same dual GEMM as the forward, different epilogue: with s = sigmoid(g),
    dL/du = dy * g * s and dL/dg = dy * u * s * (1 + g * (1 - s)). The caller finishes the
    backward with two ordinary GEMMs: dx = dh @ w_gate_up and dW = dh.T @ x.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    g, u = _dual_gemm_tile(x, w, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                           pid_m, pid_n, IEEE, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn
    dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg_ptrs = dh_ptr + offs_m[:, None].to(tl.int64) * stride_dhm + offs_n[None, :] * stride_dhn
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dg_ptrs, dg.to(dh_ptr.dtype.element_ty), mask=mask)
    du = dy * g * s
    tl.store(dg_ptrs + N * stride_dhn, du.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def linear_residual_fwd_kernel(x_ptr, w_ptr, r_ptr, y_ptr, M, N, K, stride_xm, stride_xk,
                               stride_wn, stride_wk, stride_rm, stride_rn, stride_ym,
                               stride_yn, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr):
    """y (M, N) = x @ W.T + residual; x (M, K), W (N, K), residual (M, N)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_am[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_bn[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _dot(x, w, acc, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    # Epilogue: the residual is read once and added in fp32 before the single rounding.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    r_ptrs = r_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :] * stride_rn
    acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
