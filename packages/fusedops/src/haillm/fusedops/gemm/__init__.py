"""Fused GEMMs: merged projections and GEMMs with fused epilogues (SwiGLU, residual add).

* `linear_swiglu(x, w_gate_up)`: silu(x @ W_gate.T) * (x @ W_up.T) in one Triton kernel.
* `linear_residual(x, weight, residual)`: x @ weight.T + residual, the add in the epilogue.
* `MergedLinear`: one GEMM for Q/K/V (GQA widths) or gate/up, column-parallel sliceable.
* `SwiGLUMLP`: the LLaMA MLP built on the three.
"""

from haillm.fusedops.gemm.functional import linear_residual, linear_swiglu
from haillm.fusedops.gemm.modules import MergedLinear, SwiGLUMLP
from haillm.fusedops.gemm.reference import (
    linear_residual_reference,
    linear_swiglu_reference,
    swiglu_backward_reference,
)

__all__ = [
    "MergedLinear",
    "SwiGLUMLP",
    "linear_residual",
    "linear_residual_reference",
    "linear_swiglu",
    "linear_swiglu_reference",
    "swiglu_backward_reference",
]
