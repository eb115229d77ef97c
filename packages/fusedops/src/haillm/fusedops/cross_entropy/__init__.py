"""In-place cross-entropy: `functional.inplace_cross_entropy` (public), `ops` (launchers and
the autograd Function), `kernels` (Triton), `reference` (plain PyTorch)."""

from haillm.fusedops.cross_entropy.functional import inplace_cross_entropy
from haillm.fusedops.cross_entropy.reference import cross_entropy_reference

__all__ = ["cross_entropy_reference", "inplace_cross_entropy"]
