"""haillm.parallel: tensor and sequence parallel layers with GEMM/communication overlap.

* `ParallelDims`: the dp × tp × pp rank grid (Megatron order, TP fastest) and its groups.
* `comm`: one compatibility helper over torch's collective names (torch 2.5 → newest).
"""

from .comm import (
    CompletedWork,
    all_gather_into_tensor,
    all_gather_single,
    all_reduce,
    group_rank,
    group_size,
    reduce_scatter_single,
    reduce_scatter_tensor,
)
from .dims import Coords, ParallelDims

__all__ = [
    "CompletedWork",
    "Coords",
    "ParallelDims",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_reduce",
    "group_rank",
    "group_size",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
]
