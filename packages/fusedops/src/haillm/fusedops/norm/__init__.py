"""LayerNorm / RMSNorm: `functional` (public functions and modules), `ops` (launchers and the
autograd Function), `kernels` (Triton), `reference` (plain PyTorch)."""

from haillm.fusedops.norm.functional import LayerNorm, RMSNorm, layer_norm, rms_norm
from haillm.fusedops.norm.reference import layer_norm_reference, rms_norm_reference

__all__ = ["LayerNorm", "RMSNorm", "layer_norm", "layer_norm_reference", "rms_norm",
           "rms_norm_reference"]
