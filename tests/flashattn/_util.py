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


def attention_magnitudes(q, k, v, do, causal, scale):
    """Sigma |terms| of every element of (out, dq, dk, dv), in fp64: the scale of its rounding
    errors. q (B, Sq, H, D), k/v (B, Sk, Hkv, D), do (B, Sq, H, D).

    out = P V, dV = P^T dO, dS = P (dP - D) with dP = dO V^T and D = rowsum(dO O),
    dQ = scale dS K, dK = scale dS^T Q: each magnitude is the same expression over absolute
    values, dS's from the magnitudes of its cancelling difference: P (|dO| |V|^T + |dO| |O|).
    """
    q, k, v, do = (t.detach().double() for t in (q, k, v, do))
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    rep = lambda t: t.repeat_interleave(H // Hk, dim=2)
    k, v = rep(k), rep(v)  # (B, Sk, H, D)
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        keep = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see no key: 0
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    m_out = torch.einsum("bhqk,bkhd->bqhd", p, v.abs())
    m_dv = torch.einsum("bhqk,bqhd->bkhd", p, do.abs())
    m_dp = torch.einsum("bqhd,bkhd->bhqk", do.abs(), v.abs())
    m_d = (do.abs() * out.abs()).sum(-1).transpose(1, 2)[..., None]  # (B, H, Sq, 1)
    m_ds = p * (m_dp + m_d)
    m_dq = torch.einsum("bhqk,bkhd->bqhd", m_ds, k.abs()) * abs(scale)
    m_dk = torch.einsum("bhqk,bqhd->bkhd", m_ds, q.abs()) * abs(scale)
    fold = lambda t: t.reshape(B, Sk, Hk, H // Hk, D).sum(3)  # GQA: dK/dV sum their groups
    return m_out, m_dq, fold(m_dk), fold(m_dv)


# Roundings in the chain of each output, for the floor of the low-precision rule: out and dV
# are one softmax and one product away from the inputs (scores -> P -> P V); dQ and dK two more
# (dP and D -> dS -> dS K).
ROUNDINGS = {"out": 2, "dq": 4, "dk": 4, "dv": 2}


def assert_attention_rule(got, q, k, v, do, causal, scale, names=("out", "dq", "dk", "dv")):
    """The low-precision rule for an attention kernel's (out, dq, dk, dv) `got` (any subset, in
    `names` order): against the fp64 truth of the same rounded inputs, with ONE named baseline,
    the textbook formula in the inputs' precision (`attention_reference(upcast=False)`), errors
    relative to each element's Sigma|terms| (`attention_magnitudes`), plus the floor of the
    chain's roundings and of the kernel's fp32 accumulation of its sums (score dot over d, then
    over the keys or the queries): a cancelling sum such as dK at seqlen_k = 1 (exactly 0:
    dS = P (dP - D) = 0) is held to the rounding its terms allow, not to an absolute 1e-5."""
    from haillm.flashattn import attention_reference
    from tests.helpers import assert_lowp_close

    f64 = lambda t: t.double()
    truth = fwd_bwd(lambda q, k, v: attention_reference(f64(q), f64(k), f64(v), causal=causal,
                                                        softmax_scale=scale), q, k, v, f64(do))
    plain = fwd_bwd(lambda q, k, v: attention_reference(q, k, v, causal=causal,
                                                        softmax_scale=scale, upcast=False),
                    q, k, v, do)
    mags = attention_magnitudes(q, k, v, do, causal, scale)
    every = ("out", "dq", "dk", "dv")
    sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
    for name, a in zip(names, got):
        i = every.index(name)
        assert_lowp_close(a, plain[i], truth[i], magnitude=mags[i], roundings=ROUNDINGS[name],
                          reduction=sk + sq + d, name=name)

