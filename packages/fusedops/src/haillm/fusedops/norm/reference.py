"""LayerNorm / RMSNorm (with the optional fused residual add) in plain PyTorch: the reference.

    h = x + residual                      (the residual stream of a pre-norm block)
    LayerNorm: y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias
    RMSNorm:   y = h / sqrt(mean(h^2) + eps) * weight        (Zhang & Sennrich 2019)

Statistics in fp32 (or fp64 when asked) whatever the input dtype; output in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def residual_add(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """h = x + residual in the promoted dtype (the residual stream keeps its precision)."""
    return x if residual is None else x + residual


Out = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, eps: float = 1e-5, *,
                         residual: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> Out:
    """Differentiable LayerNorm over the last dim, computed in `dtype`.

    Args:
        x: (..., N).
        weight: (N,) or None.
        bias: (N,) or None.
        eps: added to the variance.
        residual: (..., N) or None.
        dtype: compute dtype (fp32; fp64 for tests).

    Returns:
        y (..., N) in x.dtype, or (y, h) with h = x + residual when residual is given.
    """
    h = residual_add(x, residual)
    y = F.layer_norm(h.to(dtype), (h.shape[-1],), None if weight is None else weight.to(dtype),
                     None if bias is None else bias.to(dtype), eps).to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *,
                       residual: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> Out:
    """Differentiable RMSNorm over the last dim, computed in `dtype` (see layer_norm_reference).

    Args:
        x: (..., N).
        weight: (N,) or None.
        eps: added to the mean square.
        residual: (..., N) or None.
        dtype: compute dtype.

    Returns:
        y (..., N) in x.dtype, or (y, h) with h = x + residual when residual is given.
    """
    h = residual_add(x, residual)
    hd = h.to(dtype)
    y = hd * torch.rsqrt(hd.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)
