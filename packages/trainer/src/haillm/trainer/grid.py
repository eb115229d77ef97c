"""The rank grid: `haillm.parallel.ParallelDims` plus the two things the trainer asks of it.

Rank order (Megatron's, from `ParallelDims`): tensor-parallel ranks are adjacent, then
data-parallel, then pipeline stages, i.e. ``rank = pp_rank * (dp * tp) + dp_rank * tp +
tp_rank``. TP exchanges the most bytes (every layer), so its ranks share a node; PP the fewest.

The TP/SP communication regions (Megatron's f and g, the sequence-parallel all-gather and
reduce-scatter) are `haillm.parallel`'s: the model calls them with ``seq_dim=1`` because its
activations are laid out (B, S, d).
"""

from __future__ import annotations

from haillm.parallel import ParallelDims

__all__ = ["Grid"]


class Grid(ParallelDims):
    """`ParallelDims` with the trainer's names: `world` and `stage_peer`.

    Attributes:
        dp, tp, pp: degrees; rank/world: global; dp_rank, tp_rank, pp_rank: coordinates;
        dp_group, tp_group, pp_group: process groups (None when not distributed).
    """

    source = "haillm.parallel.ParallelDims"

    @property
    def world(self) -> int:
        return self.world_size

    def stage_peer(self, delta: int) -> int:
        """Global rank of the same (dp, tp) slot `delta` stages away."""
        return self.rank + delta * self.dp * self.tp

    @classmethod
    def create(cls, dp: int, tp: int, pp: int) -> Grid:
        """Validate the layout against the world and create every group (collective)."""
        return cls(dp=dp, tp=tp, pp=pp).build()
