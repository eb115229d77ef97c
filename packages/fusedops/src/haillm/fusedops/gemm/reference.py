"""Plain-PyTorch reference paths for the fused GEMMs (readable, autograd does the backward).

These are the *unfused* computations the Triton kernels must reproduce:

* SwiGLU MLP up-projection (Shazeer 2020, used by LLaMA and DeepSeek LLM):
  ``silu(x @ W_gate.T) * (x @ W_up.T)`` with ``w_gate_up = cat([W_gate, W_up])`` (nn.Linear
  layout, shape (2N, K)).
* Down-projection with the residual add of a pre-norm block: ``x @ W.T + residual``.

Each one materialises its intermediates (the two (M, N) GEMM outputs, the silu output, the
GEMM output before the add): that memory traffic is exactly what the fused kernels avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up``, elementwise.

    Args:
        gate: (..., N) pre-activation of the gate projection.
        up: (..., N) output of the up projection.

    Returns:
        (..., N) tensor.
    """
    return F.silu(gate) * up


def linear_swiglu_reference(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """Unfused ``silu(x @ W_gate.T) * (x @ W_up.T)`` in plain PyTorch.

    Args:
        x: (..., K) input activations.
        w_gate_up: (2N, K) weight, ``torch.cat([W_gate, W_up])`` in nn.Linear layout.

    Returns:
        (..., N) tensor in x's dtype.
    """
    h = x @ w_gate_up.t()  # (..., 2N): the intermediate the fused kernel never writes
    gate, up = h.chunk(2, dim=-1)  # (..., N) each
    return swiglu_reference(gate, up)


def linear_residual_reference(x: torch.Tensor, weight: torch.Tensor,
                              residual: torch.Tensor) -> torch.Tensor:
    """Unfused ``x @ weight.T + residual`` in plain PyTorch.

    Args:
        x: (..., K) input.
        weight: (N, K) nn.Linear weight.
        residual: (..., N) tensor added to the product (the residual stream).

    Returns:
        (..., N) tensor in x's dtype.
    """
    return x @ weight.t() + residual


def swiglu_backward_reference(grad_out: torch.Tensor, gate: torch.Tensor,
                              up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-written derivative of ``y = silu(g) * u`` (what the backward kernel computes).

    With ``s = sigmoid(g)``, ``silu(g) = g * s`` and ``silu'(g) = s * (1 + g * (1 - s))``, so
    ``dL/du = dy * silu(g)`` and ``dL/dg = dy * u * s * (1 + g * (1 - s))``.

    Args:
        grad_out: (..., N) gradient of the loss w.r.t. y.
        gate: (..., N) gate pre-activation g.
        up: (..., N) up projection u.

    Returns:
        ``(grad_gate, grad_up)``, each (..., N).
    """
    s = torch.sigmoid(gate)
    grad_up = grad_out * gate * s
    grad_gate = grad_out * up * s * (1 + gate * (1 - s))
    return grad_gate, grad_up
