"""Shared helpers for the flashattn tests: random inputs, a loop-based oracle, grads."""

from __future__ import annotations

import math

import torch


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, dtype=torch.float64,
             seed=0, device="cpu", scale=1.0):
    """Random (never zero) q (B, Sq, H, D), k/v (B, Sk, Hkv, D), dO (B, Sq, H, D), leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    q = mk(batch, seqlen_q, nheads, headdim)
    k = mk(batch, seqlen_k, nheads_kv, headdim)
    v = mk(batch, seqlen_k, nheads_kv, headdim)
    do = mk(batch, seqlen_q, nheads, headdim)
    return q, k, v, do


def fwd_bwd(fn, q, k, v, do):
    """Run fn on fresh leaves; return (out, dq, dk, dv) detached."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def loop_attention(q, k, v, causal, scale):
    """The most literal oracle: one query row at a time, explicit GQA head index."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    scale = 1 / math.sqrt(D) if scale is None else scale
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hk)
            for i in range(Sq):
                n = min(Sk, i + Sk - Sq + 1) if causal else Sk
                if n <= 0:
                    continue  # no visible key: zero row
                s = (k[b, :n, hk] @ q[b, i, h]) * scale
                out[b, i, h] = torch.softmax(s, 0) @ v[b, :n, hk]
    return out
