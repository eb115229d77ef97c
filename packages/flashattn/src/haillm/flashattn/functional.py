"""Public entry points: `flash_attention` and `flash_attention_varlen`, dispatching on `impl`."""

from __future__ import annotations

import math
import warnings

import torch

from .checks import TRITON_DTYPES, TRITON_MAX_HEADDIM, check_cu_seqlens, check_impl, check_qkv
from .checks import interpreting as _interpreting
from .reference import attention_reference, attention_reference_backward
from .tiled import tiled_attention, tiled_attention_backward

__all__ = ["flash_attention", "flash_attention_backward", "flash_attention_varlen", "resolve_impl"]


def _triton_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401

        from . import ops  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken triton install)
        return False, f"triton could not be imported ({e!r})"
    return True, ""


def resolve_impl(impl: str, q: torch.Tensor) -> str:
    """Which implementation runs: "reference", "tiled" (what impl="torch" names) or "triton".

    "auto" -> "triton" on CUDA tensors, "tiled" otherwise. A triton choice that cannot run
    falls back to "tiled" with a warning when it came from "auto", and raises when it was asked
    for explicitly (the policy of every haillm op, docs/architecture.md).
    """
    check_impl(impl)
    if impl in ("torch", "tiled"):
        return "tiled"
    if impl == "reference":
        return impl
    if impl == "auto" and q.device.type != "cuda":
        return "tiled"
    problem = ""
    ok, why = _triton_available()
    if not ok:
        problem = why
    elif q.device.type != "cuda" and not _interpreting():
        problem = (f"impl='triton' needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1; "
                   "impl='torch' (alias 'tiled') or impl='reference' run on any device")
    elif q.dtype not in TRITON_DTYPES:
        problem = (f"impl='triton' supports dtypes {TRITON_DTYPES}, got {q.dtype}; "
                   "impl='torch' (alias 'tiled') or impl='reference' supports it")
    elif q.shape[-1] > TRITON_MAX_HEADDIM:
        problem = (f"impl='triton' supports headdim <= {TRITON_MAX_HEADDIM}, got {q.shape[-1]}; "
                   "impl='torch' (alias 'tiled') or impl='reference' supports it")
    if not problem:
        return "triton"
    if impl == "triton":
        exc = TypeError if "dtype" in problem else ValueError
        raise exc(problem)
    warnings.warn(f"flash_attention: impl='auto' falls back to impl='torch' (tiled): {problem}",
                  stacklevel=3)
    return "tiled"


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, impl: str = "auto",
                    return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention softmax(q kᵀ · scale) v without materialising the score matrix.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k: (batch, seqlen_k, nheads_kv, headdim); nheads % nheads_kv == 0 (GQA/MQA, K/V are
            never repeated).
        v: (batch, seqlen_k, nheads_kv, headdim).
        causal: causal mask aligned to the bottom-right corner when seqlen_q != seqlen_k
            (query i sees key j iff j <= i + seqlen_k - seqlen_q); rows that see no key are 0.
        softmax_scale: defaults to 1/sqrt(headdim).
        impl: "reference" (materialises the scores), "torch" (alias "tiled": pure-PyTorch
            blockwise online softmax, backward recomputes), "triton" (FlashAttention-2
            kernels; CUDA, or CPU under TRITON_INTERPRET=1), "auto" (triton on CUDA, torch on
            CPU). An explicit "triton" that cannot run raises; see docs/architecture.md.
        return_lse: also return the logsumexp of each query row's scaled scores, the piece
            that merges partial attentions (ring attention, `haillm.parallel`).

    Returns:
        (batch, seqlen_q, nheads, headdim) in q.dtype; differentiable in q, k and v.
        With return_lse: (out, lse), lse (batch, nheads, seqlen_q) float32 (float64 for
        float64 inputs), natural log, +inf for rows that see no key; differentiable too.
    """
    check_impl(impl)
    check_qkv(q, k, v, impl=impl)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    which = resolve_impl(impl, q)
    if which == "reference":
        return attention_reference(q, k, v, causal=causal, softmax_scale=scale,
                                   return_lse=return_lse)
    if which == "tiled":
        return tiled_attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=return_lse)
    from .ops import triton_attention_packed

    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device)  # (B + 1,)
    cu_k = torch.arange(0, (B + 1) * Sk, Sk, dtype=torch.int32, device=q.device)
    pack = lambda t: t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])  # (B*S, H, D)
    out, lse = triton_attention_packed(pack(q), pack(k), pack(v), cu_q, cu_k, Sq, Sk,
                                       causal=causal, softmax_scale=scale, return_lse=True)
    out = out.view(B, Sq, H, D)
    if not return_lse:
        return out
    return out, lse.view(H, B, Sq).permute(1, 0, 2).contiguous()  # (H, B*Sq) -> (B, H, Sq)


def flash_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                             causal: bool = False, softmax_scale: float | None = None,
                             impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention backward alone, from a *given* output and logsumexp (FlashAttention-2).

    Recomputes P = exp(q kᵀ · scale - lse) block by block and uses D = rowsum(dout ∘ out).
    With (out, lse) = flash_attention(q, k, v, return_lse=True) it is the gradient of
    `flash_attention`; with the (out, lse) of an attention over more keys, of which (k, v) is
    one block, it is that block's share: dq summed over the blocks, dk and dv of this block.
    That is how ring attention's backward works (`haillm.parallel.context_parallel_attention`).

    Args:
        dout, out: (batch, seqlen_q, nheads, headdim).
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim).
        lse: (batch, nheads, seqlen_q), natural log, as `flash_attention(..., return_lse=True)`.
        causal, softmax_scale, impl: as in `flash_attention`.

    Returns:
        (dq, dk, dv) in the dtypes of q, k, v; not part of any autograd graph.
    """
    check_impl(impl)
    check_qkv(q, k, v, impl=impl)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    for name, t, shape in (("dout", dout, q.shape), ("out", out, q.shape), ("lse", lse, (B, H, Sq))):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    which = resolve_impl(impl, q)
    with torch.no_grad():
        if which == "reference":
            return attention_reference_backward(dout, q, k, v, out, lse, causal=causal,
                                                softmax_scale=scale)
        if which == "tiled":
            return tiled_attention_backward(dout, q, k, v, out, lse, causal=causal,
                                            softmax_scale=scale)
        from .ops import triton_attention_backward_packed

        cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (B + 1) * Sk, Sk, dtype=torch.int32, device=q.device)
        pack = lambda t: t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])
        lse_p = lse.permute(1, 0, 2).reshape(H, B * Sq)  # (B, H, Sq) -> (H, B*Sq)
        dq, dk, dv = triton_attention_backward_packed(
            pack(dout), pack(q), pack(k), pack(v), pack(out), lse_p, cu_q, cu_k, Sq, Sk,
            causal=causal, softmax_scale=scale)
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           softmax_scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Attention over packed variable-length sequences (no padding, no cross-sequence attention).

    Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1]
    of k and v; the result equals running `flash_attention` on each sequence alone.

    Args:
        q: (total_q, nheads, headdim).
        k: (total_k, nheads_kv, headdim).
        v: (total_k, nheads_kv, headdim).
        cu_seqlens_q: int32 (batch + 1,), starts at 0, non-decreasing, ends at total_q.
        cu_seqlens_k: int32 (batch + 1,), likewise, ends at total_k.
        max_seqlen_q: longest query sequence (the kernel's grid size).
        max_seqlen_k: longest key sequence.
        causal: as in `flash_attention` (bottom-right aligned per sequence).
        softmax_scale: defaults to 1/sqrt(headdim).
        impl: as in `flash_attention`.

    Returns:
        (total_q, nheads, headdim) in q.dtype.
    """
    check_impl(impl)
    check_qkv(q, k, v, impl=impl, varlen=True)
    offs_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, q.device)
    offs_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, q.device)
    if len(offs_q) != len(offs_k):
        raise ValueError(f"cu_seqlens_q ({len(offs_q)}) and cu_seqlens_k ({len(offs_k)}) must "
                         "have the same length (batch + 1)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    which = resolve_impl(impl, q)
    if which == "triton":
        from .ops import triton_attention_packed

        return triton_attention_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, causal=causal, softmax_scale=scale)
    # PyTorch paths: one call per sequence (the kernels do this with per-program offsets).
    outs = []
    for b in range(len(offs_q) - 1):
        qb = q[offs_q[b]:offs_q[b + 1]].unsqueeze(0)  # (1, Sq_b, H, D)
        kb = k[offs_k[b]:offs_k[b + 1]].unsqueeze(0)
        vb = v[offs_k[b]:offs_k[b + 1]].unsqueeze(0)
        if qb.shape[1] == 0:
            continue
        if kb.shape[1] == 0:  # nothing to attend to: zero output, like a fully masked row
            outs.append(torch.zeros_like(qb[0]))
            continue
        if which == "reference":
            ob = attention_reference(qb, kb, vb, causal=causal, softmax_scale=scale)
        else:
            ob = tiled_attention(qb, kb, vb, causal=causal, softmax_scale=scale)
        outs.append(ob[0])
    if not outs:
        return torch.zeros_like(q)
    return torch.cat(outs, dim=0)
