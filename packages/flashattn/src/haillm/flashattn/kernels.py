"""Triton kernels of FlashAttention-2 (Dao 2023, arXiv 2307.08691): forward, and a backward made of
a dK/dV kernel (one program per key block, no atomics) and a dQ kernel (one per query block).

Layout: every sequence is packed, q/o (total_q, nheads, headdim), k/v (total_k, nheads_kv,
headdim), and sequence b occupies rows cu_seqlens[b]:cu_seqlens[b+1]. The batched API is the
special case cu_seqlens = [0, S, 2S, ...], so batched and varlen run the same kernels.

Conventions the kernels rely on:
* scores are handled in base 2: qk_scale = softmax_scale * log2(e), so exp -> exp2 (one MUFU op).
  LSE holds the base-2 logsumexp of the scaled scores, per (head, token): (nheads, total_q).
* a query row that may attend no key gets LSE = +inf, so exp2(s - LSE) = 0 in backward and its
  output and gradients are exactly zero, without a special case.
* causal is bottom-right aligned: key j is visible to query i iff j <= i + (seqlen_k - seqlen_q)
  (`diag` below). Blocks entirely above the diagonal are never visited; blocks entirely below
  run a loop without any masking; only the blocks the diagonal (or a tail) crosses are masked.
* loads outside the sequence read 0 (and +inf for LSE), so tails need no extra branches except
  where a 0 could become a non-zero probability (key tails in forward and dQ).
* the head dim is padded to BLOCK_D (a power of two >= 16, what tl.dot needs) with masks.
"""

import triton
import triton.language as tl


@triton.jit
def _seq_bounds(CU_Q, CU_K, b):
    """Where sequence `b` starts in the packed q and k/v, and how long it is (varlen layout)."""
    q_start = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    seqlen_k = tl.load(CU_K + b + 1) - k_start
    # token offsets in int64: total_tokens * row stride can pass 2**31 elements
    return q_start.to(tl.int64), seqlen_q, k_start.to(tl.int64), seqlen_k


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys a query block [start_m, start_m + BLOCK_M) visits: [0, full) unmasked, [full, hi)
    masked. Causal (bottom-right aligned, diag = seqlen_k - seqlen_q): keys >= hi are above the
    diagonal for every row of the block and skipped entirely; keys < full are below it for
    every row and need no mask. `full` is rounded down to a whole key block."""
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M + diag)
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), seqlen_k)
    else:
        hi = seqlen_k
        full = seqlen_k
    hi = tl.where(start_m < seqlen_q, tl.maximum(hi, 0), 0)  # blocks past this sequence: no work
    full = tl.minimum((full // BLOCK_N) * BLOCK_N, hi)
    return full, hi


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi,
              offs_m, offs_n, offs_d, mask_d, seqlen_k, diag, qk_scale,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=(cols[None, :] < seqlen_k) & mask_d[:, None], other=0.0)  # (D, N)
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (M, N) fp32, base-2 units
        if MASK:
            ok = cols[None, :] < seqlen_k
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK:  # a row with every key masked so far: avoid (-inf) - (-inf) = nan
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)  # online softmax: rescale the old partial sums
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                     mask=(cols[:, None] < seqlen_k) & mask_d[None, :], other=0.0)  # (N, D)
        # accumulate inside the dot (acc is the MMA accumulator): no second register tile
        acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, qk_scale,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
               stride_ot, stride_oh, stride_lh, nheads, group, headdim, seq_bucket,
               CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), batch * nheads): one query block of one head."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group  # GQA: read the shared K/V head in place, no repeat
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, b)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < headdim
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + k_start * stride_kt + hk * stride_kh
    v_base = V + k_start * stride_vt + hk * stride_vh

    diag = seqlen_k - seqlen_q
    full, hi = _key_range(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, full,
                              offs_m, offs_n, offs_d, mask_d, seqlen_k, diag, qk_scale,
                              False, CAUSAL, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full, hi,
                              offs_m, offs_n, offs_d, mask_d, seqlen_k, diag, qk_scale,
                              True, CAUSAL, BLOCK_N, DOT_PREC)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(O + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=mask_m)


@triton.jit
def bwd_preprocess_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
                          total_q, headdim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA[h, t] = rowsum(dO ∘ O) in fp32. Grid (cdiv(total_q, BLOCK_M), nheads)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < total_q) & (offs_d[None, :] < headdim)
    o = tl.load(O + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + offs_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + h * stride_lh + offs_m, tl.sum(o * do, 1), mask=offs_m < total_q)


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
               lo, hi, offs_n, offs_d, mask_d, seqlen_q, diag, qk_scale,
               MASK: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate one query head's contribution to dK, dV of one key block (transposed tiles)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seqlen_q
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None],
                     mask=mask_m[None, :] & mask_d[:, None], other=0.0)  # (D, M)
        # rows past the sequence read LSE = +inf, so their probabilities are exactly 0
        lse = tl.load(lse_base + offs_m, mask=mask_m, other=float("inf"))
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse[None, :])
        if MASK:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pt, 0.0)  # (N, M)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (M, D)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (N, M)
        dst = pt * (dpt - delta[None, :])  # dS^T = P^T ∘ (dP^T - D)
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                    stride_lh, nheads_kv, group, headdim, seq_bucket,
                    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (cdiv(max_seqlen_k, BLOCK_N), batch * nheads_kv): one key block of one K/V head.

    The program loops over the `group` query heads that share this K/V head (GQA), so the
    reduction of their gradients happens in registers: no atomics, no dK/dV per query head.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads_kv
    hk = pid_bh % nheads_kv
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, b)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen_k
    mask_d = offs_d < headdim
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + (k_start + offs_n)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (N, D)
    v = tl.load(V + (k_start + offs_n)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = seqlen_k - seqlen_q
    hi = tl.where(start_n < seqlen_k, seqlen_q, 0)
    if CAUSAL:
        # query rows < lo see none of these keys (skipped); rows >= mid see all of them.
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, hi)
        mid = tl.minimum(mid, hi)
    else:
        lo = 0
        mid = 0
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + q_start * stride_qt + h * stride_qh
        do_base = DO + q_start * stride_dot + h * stride_doh
        lse_base = LSE + h * stride_lh + q_start
        delta_base = DELTA + h * stride_lh + q_start
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                            stride_dot, lo, mid, offs_n, offs_d, mask_d, seqlen_q, diag,
                            qk_scale, True, BLOCK_M, DOT_PREC)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                            stride_dot, mid, hi, offs_n, offs_d, mask_d, seqlen_q, diag,
                            qk_scale, False, BLOCK_M, DOT_PREC)
    dk = dk * sm_scale  # S = scale · q kᵀ, so dK = scale · dSᵀ q
    tl.store(DK + (k_start + offs_n)[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + (k_start + offs_n)[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi,
             offs_m, offs_n, offs_d, mask_d, seqlen_k, diag, qk_scale,
             MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[None, :] < seqlen_k) & mask_d[:, None]
        kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=kv_mask, other=0.0)
        vt = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None], mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse[:, None])
        if MASK:  # a zero-padded key would get probability exp2(0 - LSE) != 0
            ok = cols[None, :] < seqlen_k
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)  # (M, N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                  stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
                  nheads, group, headdim, seq_bucket,
                  CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), batch * nheads): dQ of one query block of one head."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, b)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < headdim
    qd_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=qd_mask, other=0.0)
    do = tl.load(DO + (q_start + offs_m)[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    lse = tl.load(LSE + h * stride_lh + q_start + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(DELTA + h * stride_lh + q_start + offs_m, mask=mask_m, other=0.0)
    k_base = K + k_start * stride_kt + hk * stride_kh
    v_base = V + k_start * stride_vt + hk * stride_vh

    diag = seqlen_k - seqlen_q
    full, hi = _key_range(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, full,
                  offs_m, offs_n, offs_d, mask_d, seqlen_k, diag, qk_scale,
                  False, CAUSAL, BLOCK_N, DOT_PREC)
    dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, full, hi,
                  offs_m, offs_n, offs_d, mask_d, seqlen_k, diag, qk_scale,
                  True, CAUSAL, BLOCK_N, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + (q_start + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_mask)
