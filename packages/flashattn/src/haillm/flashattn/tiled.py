"""Tiled attention in pure PyTorch: the FlashAttention algorithm without a kernel.

Forward (FlashAttention, Dao et al. 2022, Alg. 1; FlashAttention-2, Dao 2023, Alg. 1): for
each block of queries walk the K/V blocks and keep, per query row, the running maximum `m`,
the running softmax denominator `l` and an unnormalised output accumulator. When a new block
raises the maximum, the old sums are rescaled by exp(m_old - m_new) (the *online softmax*,
Milakov & Gimelshein 2018). Only O and the per-row logsumexp L = m + log(l) are kept.

Backward (FlashAttention-2, Alg. 2): the probabilities are *recomputed* block by block from
q, k and L (P = exp(q kᵀ·scale - L)); with D = rowsum(dO ∘ O) the softmax gradient is
dS = P ∘ (dP - D), so no (seqlen_q x seqlen_k) tensor is ever saved for backward: the saved
tensors are q, k, v, O and L, i.e. O(seqlen · headdim).

`tiled_attention(..., return_lse=True)` also returns L (natural log, +inf on rows that see no
key) and is differentiable in it: dL/ds = P, so an incoming dL only shifts D to D - dL.
`tiled_attention_backward` is the backward alone, from a *given* (O, L): ring attention calls it
per K/V block with the (O, L) of the merged result.

This is the teaching version and the CPU path of `impl="auto"`. The Triton kernels in
`kernels.py` run the same loops with one program per query block (forward, dQ) or key block
(dK/dV), keep the tiles in SRAM/registers, and skip fully masked causal blocks.
"""

from __future__ import annotations

import torch
from einops import rearrange

__all__ = ["TiledAttention", "tiled_attention", "tiled_attention_backward"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16/fp32 accumulate in fp32 (as the kernels do); fp64 stays fp64 for exact tests.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_mask(qs: int, qe: int, ks: int, ke: int, offset: int, device) -> torch.Tensor:
    """(qe-qs, ke-ks) bool, True where query i may attend key j: j <= i + offset (bottom-right)."""
    i = torch.arange(qs, qe, device=device)[:, None]
    j = torch.arange(ks, ke, device=device)[None, :]
    return j <= i + offset


def _key_end(qe: int, seqlen_k: int, offset: int, causal: bool) -> int:
    """Keys past this index are masked for every row of the query block [.., qe): skip them."""
    return min(seqlen_k, qe + offset) if causal else seqlen_k


def _forward(q, k, v, causal: bool, scale: float, block_q: int, block_k: int):
    """Returns O (B, Sq, H, D) in q.dtype and L (B, Hkv, G, Sq) in the accumulation dtype."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    acc = _acc_dtype(q.dtype)
    offset = Sk - Sq
    qg = rearrange(q, "b s (hk g) d -> b hk g s d", g=G)  # (B, Hkv, G, Sq, D), a view
    kh = rearrange(k, "b s hk d -> b hk s d")  # (B, Hkv, Sk, D)
    vh = rearrange(v, "b s hk d -> b hk s d")
    out = torch.empty_like(q)  # (B, Sq, H, D)
    og = rearrange(out, "b s (hk g) d -> b hk g s d", g=G)  # writable view into out
    lse = torch.empty(B, Hk, G, Sq, dtype=acc, device=q.device)

    for qs in range(0, Sq, block_q):
        qe = min(qs + block_q, Sq)
        qb = qg[:, :, :, qs:qe].to(acc)  # (B, Hkv, G, bq, D)
        m = torch.full(qb.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # running max
        l = torch.zeros_like(m)  # running sum of exp(s - m)
        o = torch.zeros_like(qb)  # running unnormalised output
        k_end = _key_end(qe, Sk, offset, causal)
        for ks in range(0, max(k_end, 0), block_k):
            ke = min(ks + block_k, k_end)
            kb, vb = kh[:, :, ks:ke].to(acc), vh[:, :, ks:ke].to(acc)  # (B, Hkv, bk, D)
            s = torch.einsum("bhgqd,bhkd->bhgqk", qb, kb) * scale  # (B, Hkv, G, bq, bk)
            if causal and ke - 1 > qs + offset:  # only blocks crossing the diagonal need a mask
                s = s.masked_fill(~_block_mask(qs, qe, ks, ke, offset, q.device), float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            # A row with every key masked so far has m_new = -inf; exp(-inf - -inf) is NaN.
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)  # rescales what was summed under the old maximum
            l = l * alpha + p.sum(dim=-1)
            o = o * alpha[..., None] + torch.einsum("bhgqk,bhkd->bhgqd", p, vb)
            m = m_new
        seen = l > 0
        og[:, :, :, qs:qe] = torch.where(seen[..., None], o / l.clamp_min(1e-30)[..., None], 0.0).to(q.dtype)
        # Rows that attend nothing get L = +inf so that backward's exp(s - L) is exactly 0.
        lse[..., qs:qe] = torch.where(seen, m + torch.log(l.clamp_min(1e-30)), float("inf"))
    return out, lse


def _backward(q, k, v, out, lse, dout, causal: bool, scale: float, block_q: int, block_k: int,
              dlse=None):
    """FlashAttention-2 backward: recompute P per block from L; returns dq, dk, dv.

    lse, dlse: (B, Hkv, G, Sq); dlse (the gradient reaching L, or None) enters as D - dL."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    acc = _acc_dtype(q.dtype)
    offset = Sk - Sq
    qg = rearrange(q, "b s (hk g) d -> b hk g s d", g=G)
    og = rearrange(out, "b s (hk g) d -> b hk g s d", g=G)
    dog = rearrange(dout, "b s (hk g) d -> b hk g s d", g=G)
    kh = rearrange(k, "b s hk d -> b hk s d")
    vh = rearrange(v, "b s hk d -> b hk s d")
    dq = torch.zeros(B, Sq, H, D, dtype=acc, device=q.device)
    dk = torch.zeros(B, Sk, Hk, D, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    dqg = rearrange(dq, "b s (hk g) d -> b hk g s d", g=G)
    dkh = rearrange(dk, "b s hk d -> b hk s d")
    dvh = rearrange(dv, "b s hk d -> b hk s d")

    for qs in range(0, Sq, block_q):
        qe = min(qs + block_q, Sq)
        qb, dob = qg[:, :, :, qs:qe].to(acc), dog[:, :, :, qs:qe].to(acc)  # (B, Hkv, G, bq, D)
        lb = lse[..., qs:qe, None]  # (B, Hkv, G, bq, 1)
        # D_i = rowsum(dO ∘ O) = sum_j P_ij dP_ij: the softmax Jacobian term, one number per row.
        Di = (dob * og[:, :, :, qs:qe].to(acc)).sum(dim=-1, keepdim=True)
        if dlse is not None:
            Di = Di - dlse[..., qs:qe, None].to(acc)
        dq_b = torch.zeros_like(qb)
        k_end = _key_end(qe, Sk, offset, causal)
        for ks in range(0, max(k_end, 0), block_k):
            ke = min(ks + block_k, k_end)
            kb, vb = kh[:, :, ks:ke].to(acc), vh[:, :, ks:ke].to(acc)  # (B, Hkv, bk, D)
            s = torch.einsum("bhgqd,bhkd->bhgqk", qb, kb) * scale
            if causal and ke - 1 > qs + offset:
                s = s.masked_fill(~_block_mask(qs, qe, ks, ke, offset, q.device), float("-inf"))
            p = torch.exp(s - lb)  # recomputed probabilities (B, Hkv, G, bq, bk)
            # Summing over g reduces the gradients of the G query heads sharing one K/V head.
            dvh[:, :, ks:ke] += torch.einsum("bhgqk,bhgqd->bhkd", p, dob)
            dp = torch.einsum("bhgqd,bhkd->bhgqk", dob, vb)
            ds = p * (dp - Di)  # gradient w.r.t. the scaled scores
            dq_b += torch.einsum("bhgqk,bhkd->bhgqd", ds, kb) * scale
            dkh[:, :, ks:ke] += torch.einsum("bhgqk,bhgqd->bhkd", ds, qb) * scale
        dqg[:, :, :, qs:qe] = dq_b
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TiledAttention(torch.autograd.Function):
    """autograd.Function: forward saves (q, k, v, O, L) only; backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, block_q: int, block_k: int):
        out, lse = _forward(q, k, v, causal, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.blocks = causal, scale, (block_q, block_k)
        ctx.set_materialize_grads(False)
        B, Hk, G, Sq = lse.shape
        return out, lse.view(B, Hk * G, Sq)  # lse (B, H, Sq): head h = hk * G + g

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.reshape(lse.shape)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.causal, ctx.scale, *ctx.blocks,
                               dlse=dlse)
        return dq, dk, dv, None, None, None, None


def tiled_attention(q, k, v, *, causal: bool = False, softmax_scale: float,
                    block_q: int = 128, block_k: int = 128, return_lse: bool = False):
    """Blockwise attention with recomputation (no checks; use `flash_attention(impl="tiled")`).

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_kv, headdim).
        return_lse: also return the logsumexp (batch, nheads, seqlen_q).

    Returns:
        (batch, seqlen_q, nheads, headdim) in q.dtype; with return_lse (out, lse), lse in
        float32 (float64 for float64 inputs).
    """
    out, lse = TiledAttention.apply(q, k, v, causal, float(softmax_scale), int(block_q),
                                    int(block_k))
    return (out, lse) if return_lse else out


def tiled_attention_backward(dout, q, k, v, out, lse, *, causal: bool = False,
                             softmax_scale: float, block_q: int = 128, block_k: int = 128):
    """(dq, dk, dv) from a given (out, lse (batch, nheads, seqlen_q)); no autograd, no checks."""
    B, Sq, H, _ = q.shape
    Hk = k.shape[2]
    lse = lse.to(_acc_dtype(q.dtype)).reshape(B, Hk, H // Hk, Sq)
    return _backward(q, k, v, out, lse, dout, causal, float(softmax_scale), int(block_q),
                     int(block_k))
