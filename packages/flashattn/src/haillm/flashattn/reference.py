"""The plain-PyTorch attention every other path is tested against.

It materialises the full (seqlen_q x seqlen_k) score matrix, exactly what FlashAttention
(Dao et al., 2022, arXiv 2205.14135) avoids. Readable first: einops for layouts, GQA by
broadcasting the K/V heads, the causal mask built explicitly.

Conventions shared by every impl of `haillm.flashattn`:

* causal with seqlen_q != seqlen_k: the mask is aligned to the *bottom-right* corner
  (FlashAttention >= 2.1): query i may attend key j iff ``j <= i + seqlen_k - seqlen_q``.
  That is what decoding with a KV cache needs (the last query sees every key).
* a query row that may attend no key at all (causal with seqlen_q > seqlen_k, first rows)
  has output **zero** (and gradient zero), not NaN, and logsumexp **+inf** (so that
  exp(s - lse) = 0 recomputes its all-zero probabilities).
* ``return_lse=True`` also returns lse (batch, nheads, seqlen_q): the natural-log logsumexp of
  the scaled scores of each query row, in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

__all__ = ["attention_reference", "attention_reference_backward", "causal_mask"]


def causal_mask(seqlen_q: int, seqlen_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask (seqlen_q, seqlen_k), True where query i may attend key j (bottom-right)."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scale) v with the whole score matrix in memory.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k: (batch, seqlen_k, nheads_kv, headdim); nheads % nheads_kv == 0 (GQA/MQA).
        v: (batch, seqlen_k, nheads_kv, headdim).
        causal: bottom-right aligned causal mask (see module docstring).
        softmax_scale: defaults to 1/sqrt(headdim).
        upcast: compute in float32 (float64 stays float64). False computes in the input
            dtype, which is what "the same-precision PyTorch path" means in tests.
        return_lse: also return the logsumexp (differentiable, like the output).

    Returns:
        (batch, seqlen_q, nheads, headdim) in q.dtype. Rows that may attend no key are zero.
        With return_lse: (out, lse), lse (batch, nheads, seqlen_q) in float32 (float64 for
        float64 inputs), +inf on rows that may attend no key.
    """
    from .checks import check_qkv

    check_qkv(q, k, v, impl="reference")
    nheads, nheads_kv, headdim = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(headdim) if softmax_scale is None else float(softmax_scale)
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()

    # GQA: query head h reads kv head h // group. Split the query heads into
    # (nheads_kv, group) and let the einsum broadcast K/V over the group: no repeat.
    group = nheads // nheads_kv
    qg = rearrange(q, "b s (hk g) d -> b hk g s d", g=group)  # (B, Hkv, G, Sq, D)
    kh = rearrange(k, "b s hk d -> b hk s d")  # (B, Hkv, Sk, D)
    vh = rearrange(v, "b s hk d -> b hk s d")  # (B, Hkv, Sk, D)

    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, kh) * scale  # (B, Hkv, G, Sq, Sk)
    if causal:
        allowed = causal_mask(q.shape[1], k.shape[1], device=q.device)  # (Sq, Sk)
        scores = scores.masked_fill(~allowed, float("-inf"))
        # A row with no allowed key would be softmax(all -inf) = NaN; define it as zero.
        empty = ~allowed.any(dim=-1)  # (Sq,)
        scores = scores.masked_fill(empty[:, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    if causal:
        probs = probs.masked_fill(empty[:, None], 0.0)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, vh)  # (B, Hkv, G, Sq, D)
    out = rearrange(out, "b hk g s d -> b s (hk g) d").to(dtype)
    if not return_lse:
        return out
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(scores.to(acc), dim=-1)  # (B, Hkv, G, Sq)
    if causal:
        lse = lse.masked_fill(empty, float("inf"))
    return out, rearrange(lse, "b hk g s -> b (hk g) s")


def attention_reference_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of attention from a *given* (out, lse), with the score matrix materialised.

    P = exp(q kᵀ · scale - lse) and dS = P ∘ (dO vᵀ - rowsum(dO ∘ out)): when (out, lse) are
    those of this very (q, k, v) this is the exact gradient; when they belong to a larger
    attention that (k, v) is one block of (ring attention), it is that block's share of it.

    Args:
        dout, out: (batch, seqlen_q, nheads, headdim).
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim).
        lse: (batch, nheads, seqlen_q), natural log (+inf: a row whose probabilities are 0).

    Returns:
        (dq, dk, dv) in the dtypes of q, k and v (computed in float32, float64 stays float64).
    """
    nheads, nheads_kv, headdim = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(headdim) if softmax_scale is None else float(softmax_scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = nheads // nheads_kv
    qg, dog, og = (rearrange(t.to(acc), "b s (hk g) d -> b hk g s d", g=g) for t in (q, dout, out))
    kh, vh = (rearrange(t.to(acc), "b s hk d -> b hk s d") for t in (k, v))
    lg = rearrange(lse.to(acc), "b (hk g) s -> b hk g s", g=g)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, kh) * scale
    if causal:
        allowed = causal_mask(q.shape[1], k.shape[1], device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.exp(scores - lg[..., None])  # (B, Hkv, G, Sq, Sk); +inf lse -> 0
    dv = torch.einsum("bhgqk,bhgqd->bhkd", probs, dog)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", dog, vh)
    ds = probs * (dp - (dog * og).sum(-1, keepdim=True))
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, kh) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg) * scale
    return (rearrange(dq, "b hk g s d -> b s (hk g) d").to(q.dtype),
            rearrange(dk, "b hk s d -> b s hk d").to(k.dtype),
            rearrange(dv, "b hk s d -> b s hk d").to(v.dtype))
