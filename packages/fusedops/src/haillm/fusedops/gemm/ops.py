"""Launchers and autograd Functions of `linear_swiglu` / `linear_residual` (the public
functions, their checks and the impl choice: `functional.py`).

Backward of `linear_swiglu` (a choice, documented in the tutorial): we save only ``x`` and
``w_gate_up`` and *recompute* gate and up in the backward, inside the same dual-GEMM kernel
whose epilogue now produces ``dh = [dL/dgate, dL/dup]`` (M, 2N) instead of y. Storing gate
and up instead would cost 2*M*N activations per layer (4096 tokens x 11008 x 2 x 2 bytes =
180 MB per LLaMA-7B layer in bf16) — exactly the tensors the fused forward avoids writing —
while the recomputation costs one extra (M, 2N, K) GEMM, as activation checkpointing of the
MLP would. The two remaining backward GEMMs, ``dx = dh @ w_gate_up`` and
``dW = dh.T @ x``, are ordinary matmuls left to cuBLAS (torch), which is as fast as it gets
for plain GEMMs; the fusion buys nothing there.

`linear_residual` needs no recomputation: its backward is ``dx = dy @ W``, ``dW = dy.T @ x``
and ``d residual = dy`` (all torch).
"""

from __future__ import annotations

import functools
import os

import torch

from haillm.fusedops._dispatch import interpreting as _interpreting

try:  # Triton is optional (e.g. macOS); the reference path works without it.
    import triton

    from haillm.fusedops.gemm import kernels

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is installed on Linux
    triton = None
    kernels = None
    HAS_TRITON = False
try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = ["LinearResidualFn", "LinearSwiGLUFn", "residual_fwd_triton", "swiglu_bwd_triton",
           "swiglu_fwd_triton"]


def _autotune_configs(two_accumulators: bool, fp32: bool = False, hopper: bool = True):
    """Tile configurations. The interpreter takes exactly one (autotune with >= 2 fails there).

    On a GPU (Hopper-class: 227 KB of shared memory per block) a handful of large tiles for
    bf16/fp16 (tensor-core wgmma; the dual GEMM holds two fp32 accumulators, so its effective
    tile is BLOCK_M x 2*BLOCK_N; 3-4 stages of (BM + 2 BN) x BK x 2 bytes fit). Before Hopper
    (`hopper=False`: mma.sync keeps the accumulators in registers, no wgmma) the dual GEMM's
    128 x 2*128 tiles spill ~3.9 KB per thread (ptxas for sm_80, docs/benchmarks/kernels.md):
    it gets smaller tiles that compile without spills there. fp32 inputs
    (IEEE products, no tensor cores: a correctness path, not a fast one) get one small tile:
    a 128x128x64 fp32 tile needs 192 KB of shared memory and compiles for half a minute.
    ``HAILLM_GEMM_AUTOTUNE=0`` pins the first config (quick compiles in GPU tests).
    """
    def C(kw, **opts):  # every config resizes the TMA descriptors' blocks to its tile
        return triton.Config(kw, pre_hook=_set_descriptor_blocks, **opts)

    if _interpreting():
        return [C(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4), num_warps=4,
                  num_stages=1)]
    if fp32:
        return [C(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), num_warps=4,
                  num_stages=3)]
    if two_accumulators and not hopper:
        configs = [
            C(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
            C(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
            C(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
        ]
    elif two_accumulators:
        configs = [
            C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
            C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=4),
            C(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
            C(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
        ]
    else:
        configs = [
            C(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
            C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=4),
            C(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
            C(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
        ]
    if os.environ.get("HAILLM_GEMM_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    return configs


def _set_descriptor_blocks(nargs) -> None:
    """Autotune pre-hook: a TMA descriptor's block shape must match the config's tile."""
    x, w = nargs.get("x"), nargs.get("w")
    if TensorDescriptor is not None and isinstance(x, TensorDescriptor):
        x.block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        w.block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the swiglu kernels can load tiles with TMA descriptors.

    Needs Hopper or newer (or the interpreter), 16-bit inputs (the fp32 path is the simple
    one), unit stride along K and 16-byte-aligned rows and base addresses.
    ``HAILLM_GEMM_TMA=0`` turns it off.
    """
    if TensorDescriptor is None or os.environ.get("HAILLM_GEMM_TMA", "1") == "0":
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in (x, w))


if HAS_TRITON:
    # Tuned per (N, K) (and dtype): the token count M changes every batch, the layer shapes
    # don't. One autotuner per (kernel, fp32 or not, Hopper or not): {(fp32, hopper): tuner}.
    def _tuned(kernel, two_accumulators, key):
        return {(fp32, hopper): triton.autotune(_autotune_configs(two_accumulators, fp32, hopper),
                                                key=key)(kernel)
                for fp32 in (False, True) for hopper in (False, True)}

    _swiglu_fwd = _tuned(kernels.linear_swiglu_fwd_kernel, True, ["N", "K", "TMA"])
    _swiglu_bwd = _tuned(kernels.linear_swiglu_bwd_kernel, True, ["N", "K", "TMA"])
    _residual_fwd = _tuned(kernels.linear_residual_fwd_kernel, False, ["N", "K"])


@functools.cache
def _target_arch(device: int) -> int:
    return triton.runtime.driver.active.get_current_target().arch


def _hopper() -> bool:
    """Whether Triton compiles for sm_90 or newer (asked of Triton's driver, once per device:
    its current device is the one the kernel launches on). The interpreter counts as Hopper
    (it has one config anyway)."""
    if _interpreting():
        return True
    return _target_arch(triton.runtime.driver.active.get_current_device()) >= 90


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


# --------------------------------------------------------------------------- launchers
def _operands(x: torch.Tensor, w: torch.Tensor, tma: bool | None):
    """(x, w, TMA): tensors, or TMA descriptors (block shapes set by the autotune pre-hook)."""
    if tma is None:
        tma = _tma_ok(x, w)
    if not tma:
        return x, w, False
    return (TensorDescriptor.from_tensor(x, [16, 16]),
            TensorDescriptor.from_tensor(w, [16, 16]), True)


def swiglu_fwd_triton(x: torch.Tensor, w: torch.Tensor, tma: bool | None = None) -> torch.Tensor:
    """Launch the fused forward: x (M, K), w_gate_up (2N, K) -> y (M, N).

    ``tma``: load tiles with TMA descriptors (default: when `_tma_ok`), else pointer grids.
    """
    M, K = x.shape
    N = w.shape[0] // 2
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()  # silu(0) * 0
    fp32 = x.dtype == torch.float32
    xa, wa, use_tma = _operands(x, w, tma)
    _swiglu_fwd[fp32, _hopper()][_grid(M, N)](
        xa, wa, y, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        y.stride(0), y.stride(1), IEEE=fp32, TMA=use_tma)
    return y


def swiglu_bwd_triton(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor,
                      tma: bool | None = None) -> torch.Tensor:
    """Launch the recomputing backward epilogue: returns dh (M, 2N) = [dL/dgate, dL/dup]."""
    M, K = x.shape
    N = w.shape[0] // 2
    dh = torch.empty(M, 2 * N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return dh
    if K == 0:
        return dh.zero_()
    fp32 = x.dtype == torch.float32
    xa, wa, use_tma = _operands(x, w, tma)
    _swiglu_bwd[fp32, _hopper()][_grid(M, N)](
        xa, wa, dy, dh, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        dy.stride(0), dy.stride(1), dh.stride(0), dh.stride(1), IEEE=fp32, TMA=use_tma)
    return dh


def residual_fwd_triton(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Launch the GEMM + residual epilogue: x (M, K), w (N, K), r (M, N) -> y (M, N).

    y's dtype is ``promote_types(x.dtype, r.dtype)``: an fp32 residual stream with bf16
    GEMM operands gives an fp32 sum, rounded once from the fp32 accumulator.
    """
    M, K = x.shape
    N = w.shape[0]
    out_dtype = torch.promote_types(x.dtype, r.dtype)  # as `x @ w.T + r` in PyTorch
    if M == 0 or N == 0 or K == 0:
        return r.to(out_dtype, copy=True)
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    fp32 = x.dtype == torch.float32
    _residual_fwd[fp32, _hopper()][_grid(M, N)](
        x, w, r, y, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        r.stride(0), r.stride(1), y.stride(0), y.stride(1), IEEE=fp32)
    return y


# --------------------------------------------------------------------------- autograd
class LinearSwiGLUFn(torch.autograd.Function):
    """Fused SwiGLU projection; saves (x, w_gate_up) only, recomputes gate/up in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        K, N = x.shape[-1], w.shape[0] // 2
        x2 = x.reshape(-1, K)  # (M, K): leading dims flattened
        y = swiglu_fwd_triton(x2, w)  # (M, N)
        ctx.save_for_backward(x2, w)
        ctx.lead_shape = x.shape[:-1]
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w = ctx.saved_tensors
        N = w.shape[0] // 2
        dy2 = dy.reshape(-1, N).to(x2.dtype)  # (M, N)
        dh = swiglu_bwd_triton(x2, w, dy2)  # (M, 2N) = [dgate, dup]
        dx = (dh @ w).reshape(*ctx.lead_shape, w.shape[1]) if ctx.needs_input_grad[0] else None
        dw = dh.t() @ x2 if ctx.needs_input_grad[1] else None  # (2N, K)
        return dx, dw


class LinearResidualFn(torch.autograd.Function):
    """GEMM with the residual add in its epilogue; backward is plain torch matmuls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        K, N = x.shape[-1], w.shape[0]
        x2 = x.reshape(-1, K)  # (M, K)
        y = residual_fwd_triton(x2, w, r.reshape(-1, N))  # (M, N)
        ctx.save_for_backward(x2, w)
        ctx.r_dtype = r.dtype
        ctx.lead_shape = x.shape[:-1]
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, w.shape[0]).to(x2.dtype)  # (M, N)
        dx = (dy2 @ w).reshape(*ctx.lead_shape, w.shape[1]) if ctx.needs_input_grad[0] else None
        dw = dy2.t() @ x2 if ctx.needs_input_grad[1] else None  # (N, K)
        dr = dy.to(ctx.r_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, dr
