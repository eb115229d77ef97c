"""The public fused GEMMs `linear_swiglu` and `linear_residual`: checks, autocast and the impl
choice (the shared policy of `haillm.fusedops._dispatch`); the kernels run through `ops`.
"""

from __future__ import annotations

import torch

from haillm.fusedops._dispatch import autocast as _autocast
from haillm.fusedops._dispatch import resolve_impl
from haillm.fusedops.gemm.ops import LinearResidualFn, LinearSwiGLUFn
from haillm.fusedops.gemm.reference import linear_residual_reference, linear_swiglu_reference

__all__ = ["linear_residual", "linear_swiglu"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_common(x, weight, wname: str, extra=()):
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, *(t for _, t in extra))):
        raise TypeError(f"x, {wname}{''.join(', ' + n for n, _ in extra)} must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"{wname} must be 2-D in nn.Linear layout, got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim (K={x.shape[-1]}) must equal {wname}.shape[1] "
                         f"({weight.shape[1]}); {wname} has shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{wname} dtype {weight.dtype} must equal x dtype {x.dtype}")
    for name, t in ((wname, weight), *extra):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _use_triton(impl: str, x: torch.Tensor, op: str) -> bool:
    """The shared policy (`haillm.fusedops._dispatch.resolve_impl`): "torch" and "reference"
    both run the unfused PyTorch reference (the GEMMs have one PyTorch path); an explicit
    "triton" that cannot run raises; "auto" falls back with a warning on CUDA."""
    return resolve_impl(impl, x, op=op, dtypes=_KERNEL_DTYPES) == "triton"


def linear_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Fused SwiGLU projection ``silu(x @ W_gate.T) * (x @ W_up.T)``.

    One Triton kernel computes both GEMM accumulators per output tile in fp32 and applies the
    activation in its epilogue: the two (M, N) products are never written to memory. The
    backward recomputes them from the saved ``x`` and ``w_gate_up`` (one extra GEMM instead of
    2*M*N stored activations) in a second dual-GEMM kernel whose epilogue emits
    ``[dL/dgate, dL/dup]``, then finishes with two torch matmuls.

    Args:
        x: (..., K) activations; leading dims are flattened to M rows. fp16, bf16 or fp32
            (fp64 runs the reference).
        w_gate_up: (2N, K) ``torch.cat([W_gate, W_up])``, nn.Linear layout, same dtype and
            device as x (e.g. `MergedLinear.weight` with two equal parts).
        impl: "auto" (Triton on CUDA, PyTorch on CPU), "triton", "torch" or "reference"
            (the same unfused PyTorch code here; see docs/architecture.md for the policy).

    Returns:
        (..., N) tensor in x's dtype. Under ``torch.autocast`` x and w_gate_up are cast to
        the autocast dtype first (as nn.Linear's operands are).

    Raises:
        ValueError: odd number of rows in w_gate_up, K mismatch, device mismatch, bad impl.
        TypeError: dtype mismatch.
    """
    if isinstance(x, torch.Tensor) and isinstance(w_gate_up, torch.Tensor):
        x, w_gate_up = _autocast(x, w_gate_up)
    _check_common(x, w_gate_up, "w_gate_up")
    if w_gate_up.shape[0] % 2 != 0:
        raise ValueError(f"w_gate_up rows ({w_gate_up.shape[0]}) must be even: it is "
                         f"cat([W_gate, W_up]) of shape (2N, K), got {tuple(w_gate_up.shape)}")
    if not _use_triton(impl, x, "linear_swiglu"):
        return linear_swiglu_reference(x, w_gate_up)
    return LinearSwiGLUFn.apply(x, w_gate_up)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, *,
                    impl: str = "auto") -> torch.Tensor:
    """``x @ weight.T + residual`` with the add fused into the GEMM's epilogue.

    Saves one write and one read of the (M, N) product (and a kernel launch) against
    ``F.linear(x, weight) + residual``; the sum is rounded once, from fp32.

    Args:
        x: (..., K) input.
        weight: (N, K) nn.Linear weight, same dtype/device as x.
        residual: (..., N) the residual stream, same leading shape and device as x; any
            float dtype (e.g. an fp32 residual stream with bf16 GEMM operands).
        impl: "auto" (Triton on CUDA, PyTorch on CPU), "triton", "torch" or "reference"
            (the same unfused PyTorch code here; see docs/architecture.md for the policy).

    Returns:
        (..., N) tensor of dtype ``promote_types(x.dtype, residual.dtype)``, as
        ``x @ weight.T + residual`` would give. Under ``torch.autocast`` x and weight are
        cast to the autocast dtype first (as nn.Linear's are).

    Raises:
        ValueError: K mismatch, residual shape mismatch, device mismatch, bad impl.
        TypeError: x/weight dtype mismatch, non-float residual.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        x, weight = _autocast(x, weight)
    _check_common(x, weight, "weight", extra=(("residual", residual),))
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(residual.shape) != expected:
        raise ValueError(f"residual must have shape x.shape[:-1] + (weight.shape[0],) = "
                         f"{expected}, got {tuple(residual.shape)}")
    if not _use_triton(impl, x, "linear_residual"):
        return linear_residual_reference(x, weight, residual)
    return LinearResidualFn.apply(x, weight, residual)
