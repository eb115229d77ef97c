"""Launchers for the Triton kernels and the autograd.Function that ties them together.

The batched API (batch, seqlen, nheads, headdim) is flattened to the packed layout
(batch * seqlen, nheads, headdim) with cu_seqlens = [0, S, 2S, ...]: a view, no copy, so
batched and varlen inputs run the very same kernels.

Block sizes: fixed, per head dim and dtype (`_config`), chosen for Hopper/Ampere-class GPUs;
`HAILLM_FLASHATTN_AUTOTUNE=1` lets `triton.autotune` pick among <= 4 configs per kernel instead
(the GPU benchmark does this). Under the Triton interpreter every block is 16 so that tiny test
shapes still cross several blocks and masked tails.
"""

from __future__ import annotations

import os

import torch
import triton

from . import kernels
from .checks import interpreting

__all__ = ["TritonAttention", "triton_attention_backward_packed", "triton_attention_packed"]

INTERPRET = interpreting()  # read once: the kernels were defined for one mode
AUTOTUNE = (not INTERPRET) and os.environ.get("HAILLM_FLASHATTN_AUTOTUNE", "0") == "1"
LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N) per kernel under the interpreter: small, so tiny test shapes still cross
# several blocks; tests also set unequal sizes, as the GPU configs use.
INTERPRET_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}


def _block_d(headdim: int) -> int:
    return max(16, triton.next_power_of_2(headdim))  # tl.dot needs every dim >= 16


def _seq_bucket(max_seqlen: int) -> int:
    return 0 if max_seqlen <= 1024 else 1  # autotune key: short and long sequences differ


def _config(kind: str, block_d: int, dtype: torch.dtype) -> dict:
    """Fixed launch configuration (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel."""
    if INTERPRET:
        m, n = INTERPRET_BLOCKS[kind]
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=1, num_stages=1)
    big = block_d > 64
    # Chosen with `ptxas` without a GPU (tests/kernels_compile.py; the table is in
    # docs/benchmarks/kernels.md): the 16-bit configs compile without register spills on sm_90,
    # and every config fits sm_80's shared memory.
    if dtype == torch.float32:
        # IEEE fp32 products run on the FMA units, not the tensor cores: the operand tiles live
        # in registers, so tiles are small (64x32 tiles at head dim 128 spilled ~8 KB/thread).
        if not big:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if block_d <= 32 else 8, num_stages=2)
        if block_d > 128:  # head dims 129..256: (32, 16) forward spilled 40 B
            m, n = {"fwd": (16, 16), "dkdv": (16, 32), "dq": (32, 16)}[kind]
        else:
            m, n = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}[kind]
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=8, num_stages=2)
    if block_d > 128:
        # Head dims 129..256 (FlashAttention-2's range): a 64 x 256 fp32 accumulator is already
        # 64 registers per thread at 8 warps, so the key/query steps are 32 wide. Measured on
        # sm_90: forward 64x64 spilled 40 B, dK-dV 32x64 480 B and 64x32 88 B, dQ 64x64 304 B.
        m, n, stages = {"fwd": (64, 32, 3), "dkdv": (32, 32, 2), "dq": (64, 32, 2)}[kind]
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=8, num_stages=stages)
    # 16-bit inputs: the accumulators (acc / dK, dV / dQ) and the score tile all live in
    # registers; dK-dV at head dim 128 steps through Q in blocks of 32 (64 spilled 232 B).
    if kind == "fwd":
        return dict(BLOCK_M=128, BLOCK_N=32 if big else 64, num_warps=8, num_stages=3)
    if kind == "dkdv":
        return dict(BLOCK_M=32 if big else 64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if big else 4, num_stages=2 if big else 3)


# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) by (kernel, head-dim tier: 0 for
# <= 64, 1 for <= 128, 2 for <= 256): the fixed default first, then alternatives; kept short
# because every one costs a compile.
_TUNE_SPACE = {
    ("fwd", False): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    ("fwd", True): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2)],
    ("dkdv", False): [(64, 64, 8, 2), (64, 64, 4, 2), (32, 128, 4, 3)],
    ("dkdv", True): [(32, 64, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
    ("dq", False): [(64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2)],
    ("dq", True): [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    ("fwd", 2): [(64, 32, 8, 3), (64, 32, 8, 2)],
    ("dkdv", 2): [(32, 32, 8, 2), (16, 32, 8, 2)],
    ("dq", 2): [(64, 32, 8, 2), (32, 32, 8, 2)],
}
_TUNED: dict[tuple[str, object], object] = {}


def _tier(block_d: int):
    """The autotune key's head-dim tier (False/True: <= 64 / <= 128, as before; 2: <= 256)."""
    return 2 if block_d > 128 else block_d > 64


def _bench(fn, quantiles=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _launch(kind: str, kernel, grid, args, *, CAUSAL, BLOCK_D, DOT_PREC, dtype):
    """Run `kernel` with a fixed config, or through a (cached) autotuner on GPU."""
    if AUTOTUNE and dtype != torch.float32:
        tkey = (kind, _tier(BLOCK_D))
        if tkey not in _TUNED:
            configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
                       for m, n, w, s in _TUNE_SPACE[tkey]]
            key = ["headdim", "seq_bucket", "CAUSAL", "DOT_PREC"]
            try:
                tuner = triton.autotune(configs, key=key, do_bench=_bench)
            except TypeError:  # older triton: no do_bench argument
                tuner = triton.autotune(configs, key=key, warmup=5, rep=20)
            _TUNED[tkey] = tuner(kernel)
        _TUNED[tkey][grid](*args, CAUSAL=CAUSAL, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
        return
    cfg = _config(kind, BLOCK_D, dtype)
    meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    kernel[grid(meta)](*args, CAUSAL=CAUSAL, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC, **meta,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _fwd(q, k, v, cu_q, cu_k, max_sq, max_sk, causal, scale):
    """q (Tq, H, D), k/v (Tk, Hkv, D) -> o (Tq, H, D), lse (H, Tq) fp32 base-2."""
    Tq, H, D = q.shape
    Hk = k.shape[1]
    batch = cu_q.numel() - 1
    o = torch.empty_like(q)
    lse = torch.empty(H, Tq, dtype=torch.float32, device=q.device)
    bd = _block_d(D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = lambda META: (triton.cdiv(max_sq, META["BLOCK_M"]), batch * H)
    args = (q, k, v, o, lse, cu_q, cu_k, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), lse.stride(0), H, H // Hk, D, _seq_bucket(max_sk))
    _launch("fwd", kernels.fwd_kernel, grid, args, CAUSAL=causal, BLOCK_D=bd, DOT_PREC=prec,
            dtype=q.dtype)
    return o, lse


def _bwd(do, q, k, v, o, lse, cu_q, cu_k, max_sq, max_sk, causal, scale, dlse=None):
    """lse (H, Tq) base 2; dlse (H, Tq) natural log or None (a gradient reaching the lse)."""
    Tq, H, D = q.shape
    Hk = k.shape[1]
    batch = cu_q.numel() - 1
    bd = _block_d(D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty_like(lse)  # (H, Tq) fp32: rowsum(dO ∘ O)
    pre_m = 16 if INTERPRET else 64
    kernels.bwd_preprocess_kernel[(triton.cdiv(Tq, pre_m), H)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        Tq, D, BLOCK_M=pre_m, BLOCK_D=bd)
    if dlse is not None:  # d lse / d s = P: an incoming dlse shifts D to D - dlse
        delta = delta - dlse.float()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid_kv = lambda META: (triton.cdiv(max_sk, META["BLOCK_N"]), batch * Hk)
    _launch("dkdv", kernels.bwd_dkdv_kernel, grid_kv, (
        q, k, v, do, dk, dv, lse, delta, cu_q, cu_k, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), Hk, H // Hk, D, _seq_bucket(max_sq)),
        CAUSAL=causal, BLOCK_D=bd, DOT_PREC=prec, dtype=q.dtype)
    grid_q = lambda META: (triton.cdiv(max_sq, META["BLOCK_M"]), batch * H)
    _launch("dq", kernels.bwd_dq_kernel, grid_q, (
        q, k, v, do, dq, lse, delta, cu_q, cu_k, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        H, H // Hk, D, _seq_bucket(max_sk)),
        CAUSAL=causal, BLOCK_D=bd, DOT_PREC=prec, dtype=q.dtype)
    return dq, dk, dv


class TritonAttention(torch.autograd.Function):
    """Packed-layout FlashAttention-2: saves q, k, v, O and the logsumexp only."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_sq, max_sk, causal, scale):
        o, lse = _fwd(q, k, v, cu_q, cu_k, max_sq, max_sk, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_sq, max_sk, causal, scale)
        ctx.set_materialize_grads(False)
        return o, lse / LOG2E  # lse (H, Tq) in natural log (+inf stays +inf)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dq, dk, dv = _bwd(do, q, k, v, o, lse, cu_q, cu_k, *ctx.args, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None, None


def triton_attention_packed(q, k, v, cu_q, cu_k, max_sq: int, max_sk: int, *, causal: bool,
                            softmax_scale: float, return_lse: bool = False):
    """Packed-layout entry (no checks).

    Args:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_kv, headdim).
        cu_q, cu_k: int32 (batch + 1,) offsets on q's device.

    Returns:
        (total_q, nheads, headdim) in q.dtype; with return_lse also lse (nheads, total_q) fp32,
        natural log.
    """
    dtype = q.dtype
    if INTERPRET and dtype == torch.bfloat16:
        # The interpreter cannot do bf16 arithmetic: compute in fp32, round once at the end.
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = TritonAttention.apply(q, k, v, cu_q, cu_k, int(max_sq), int(max_sk), bool(causal),
                                     float(softmax_scale))
    return (out.to(dtype), lse) if return_lse else out.to(dtype)


def triton_attention_backward_packed(do, q, k, v, o, lse, cu_q, cu_k, max_sq: int, max_sk: int,
                                     *, causal: bool, softmax_scale: float):
    """(dq, dk, dv) from a given (o, lse (nheads, total_q) natural log); packed layout, no
    autograd, no checks: the backward kernels alone (ring attention's per-block backward)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    if INTERPRET and q.dtype == torch.bfloat16:
        do, q, k, v, o = (t.float() for t in (do, q, k, v, o))
    do, q, k, v, o = (t if t.stride(-1) == 1 else t.contiguous() for t in (do, q, k, v, o))
    lse2 = (lse.float() * LOG2E).contiguous()
    dq, dk, dv = _bwd(do, q, k, v, o, lse2, cu_q, cu_k, int(max_sq), int(max_sk), bool(causal),
                      float(softmax_scale))
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])
