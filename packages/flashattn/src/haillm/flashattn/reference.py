"""The plain-PyTorch attention every other path is tested against.

It materialises the full (seqlen_q x seqlen_k) score matrix, exactly what FlashAttention
(Dao et al., 2022, arXiv 2205.14135) avoids. Readable first: einops for layouts, GQA by
broadcasting the K/V heads, the causal mask built explicitly.

Conventions shared by every impl of `haillm.flashattn`:

* causal with seqlen_q != seqlen_k: the mask is aligned to the *bottom-right* corner
  (FlashAttention >= 2.1): query i may attend key j iff ``j <= i + seqlen_k - seqlen_q``.
  That is what decoding with a KV cache needs (the last query sees every key).
* a query row that may attend no key at all (causal with seqlen_q > seqlen_k, first rows)
  has output **zero** (and gradient zero), not NaN.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

__all__ = ["attention_reference", "causal_mask"]


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
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with the whole score matrix in memory.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k: (batch, seqlen_k, nheads_kv, headdim); nheads % nheads_kv == 0 (GQA/MQA).
        v: (batch, seqlen_k, nheads_kv, headdim).
        causal: bottom-right aligned causal mask (see module docstring).
        softmax_scale: defaults to 1/sqrt(headdim).
        upcast: compute in float32 (float64 stays float64). False computes in the input
            dtype, which is what "the same-precision PyTorch path" means in tests.

    Returns:
        (batch, seqlen_q, nheads, headdim) in q.dtype. Rows that may attend no key are zero.
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
    return rearrange(out, "b hk g s d -> b s (hk g) d").to(dtype)
