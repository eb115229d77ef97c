"""haillm.fusedops: fused LayerNorm/RMSNorm, fused AdamW, in-place cross-entropy, fused GEMMs.

Every op takes `impl=` in the shared vocabulary (`_dispatch`, docs/architecture.md):
"reference" (plain PyTorch), "torch" (the optimized PyTorch path, used on CPU by "auto"),
"triton" (used on CUDA by "auto"; raises when asked for explicitly and it cannot run), "auto".

Layout, one folder per op as in `haillm.flashattn`: `norm/`, `adamw/`, `cross_entropy/`,
`gemm/`, each with `reference.py` (plain PyTorch), `kernels.py` (`@triton.jit` only), `ops.py`
(launchers, autograd Functions) and the public functions (`functional.py`; AdamW: `ops.py` and
`optimizer.py`; the GEMMs also `modules.py`).
"""

from haillm.fusedops.adamw import FusedAdamW, adamw_step_, adamw_step_reference_
from haillm.fusedops.cross_entropy import cross_entropy_reference, inplace_cross_entropy
from haillm.fusedops.gemm import MergedLinear, SwiGLUMLP, linear_residual, linear_swiglu
from haillm.fusedops.norm import (
    LayerNorm,
    RMSNorm,
    layer_norm,
    layer_norm_reference,
    rms_norm,
    rms_norm_reference,
)

__all__ = [
    # norms, AdamW, in-place cross-entropy
    "FusedAdamW",
    "LayerNorm",
    "RMSNorm",
    "adamw_step_",
    "adamw_step_reference_",
    "cross_entropy_reference",
    "inplace_cross_entropy",
    "layer_norm",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    # fused GEMMs
    "MergedLinear",
    "SwiGLUMLP",
    "linear_residual",
    "linear_swiglu",
]
