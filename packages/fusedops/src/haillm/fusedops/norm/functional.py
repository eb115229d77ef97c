"""`layer_norm`, `rms_norm` and the `LayerNorm`, `RMSNorm` modules (dispatch + validation).

The teaching version is `reference` (PyTorch, fp32 statistics, autograd for the gradients);
the real one (`kernels`, launched by `ops`) computes forward and backward in one pass per row,
fuses the residual add of pre-norm blocks, and reduces dw/db without atomics.
"""

from __future__ import annotations

import torch
from torch import nn

from haillm.fusedops._dispatch import resolve_impl
from haillm.fusedops.norm.ops import NormFn
from haillm.fusedops.norm.reference import Out, layer_norm_reference, rms_norm_reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(op, x, weight, bias, residual):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be (..., N) with N >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x dtype must be one of {_DTYPES}, got {x.dtype}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"{op}: {name} must have shape ({n},) (the last dim of x), got "
                             f"{tuple(p.shape)}")
        if p is not None and p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device}, x on {x.device}")
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{op}: residual shape {tuple(residual.shape)} must equal x shape "
                             f"{tuple(x.shape)}")
        if residual.device != x.device:
            raise ValueError(f"{op}: residual is on {residual.device}, x on {x.device}")


def _backend(op, impl, x):
    """"triton", or "torch" / "reference": the same PyTorch code for the norms (one path)."""
    return resolve_impl(impl, x, op=op)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, *, residual: torch.Tensor | None = None, impl: str = "auto",
               block_n: int | None = None) -> Out:
    """LayerNorm over the last dim, fp32 statistics; optionally fused with the residual add.

    Args:
        x: (..., N) fp32/fp16/bf16 (fp64 on the PyTorch path).
        weight: (N,) or None.
        bias: (N,) or None.
        eps: added to the variance.
        residual: (..., N) or None. When given, h = x + residual is formed in the same pass.
        impl: "auto" (Triton on CUDA, PyTorch on CPU), "triton", "torch" or "reference"
            (the same PyTorch code for the norms; see docs/architecture.md for the policy).
        block_n: column block of the Triton kernel (default: the whole row up to 64 KB).

    Returns:
        y (..., N) in x.dtype; or (y, h) with y = LayerNorm(h), h = x + residual (in the
        promoted dtype of x and residual) when residual is given.
    """
    _check("layer_norm", x, weight, bias, residual)
    if _backend("layer_norm", impl, x) != "triton":
        return layer_norm_reference(x, weight, bias, eps, residual=residual,
                                    dtype=torch.float64 if x.dtype == torch.float64
                                    else torch.float32)
    return NormFn.apply(x, weight, bias, residual, eps, False, block_n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *,
             residual: torch.Tensor | None = None, impl: str = "auto",
             block_n: int | None = None) -> Out:
    """RMSNorm over the last dim (Zhang & Sennrich 2019), fp32 statistics, optional residual.

    Args:
        x: (..., N).
        weight: (N,) or None.
        eps: added to the mean square.
        residual: (..., N) or None.
        impl: "auto", "triton", "torch" or "reference" (see `layer_norm`).
        block_n: column block of the Triton kernel.

    Returns:
        y (..., N) in x.dtype; or (y, h) with h = x + residual when residual is given.
    """
    _check("rms_norm", x, weight, None, residual)
    if _backend("rms_norm", impl, x) != "triton":
        return rms_norm_reference(x, weight, eps, residual=residual,
                                  dtype=torch.float64 if x.dtype == torch.float64
                                  else torch.float32)
    return NormFn.apply(x, weight, None, residual, eps, True, block_n)


class LayerNorm(nn.Module):
    """LayerNorm with a learnable weight (ones) and bias (zeros); `forward(x, residual=None)`.

    Args:
        hidden_size: N, the normalised (last) dimension.
        eps: added to the variance.
        impl: see `layer_norm`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.eps, self.impl = hidden_size, eps, impl
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Out:
        """x: (..., N) -> (..., N), or (y, x + residual) when residual is given."""
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight (ones); `forward(x, residual=None)`.

    Args:
        hidden_size: N, the normalised (last) dimension.
        eps: added to the mean square.
        impl: see `rms_norm`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.eps, self.impl = hidden_size, eps, impl
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Out:
        """x: (..., N) -> (..., N), or (y, x + residual) when residual is given."""
        return rms_norm(x, self.weight, self.eps, residual=residual, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
