"""Fused AdamW: `ops` (the public `adamw_step_` and its launcher), `optimizer` (`FusedAdamW`),
`kernels` (Triton), `reference` (plain PyTorch)."""

from haillm.fusedops.adamw.ops import adamw_step_, adamw_step_triton_
from haillm.fusedops.adamw.optimizer import FusedAdamW
from haillm.fusedops.adamw.reference import adamw_step_reference_

__all__ = ["FusedAdamW", "adamw_step_", "adamw_step_reference_", "adamw_step_triton_"]
