"""The rank grid: which rank does which slice of data, tensor and pipeline parallelism.

`ParallelDims(dp, tp, pp)` lays the `world_size = dp * tp * pp` ranks out as a 3-D grid in the
Megatron-LM order, **TP fastest, then DP, then PP**:

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so the `tp` ranks of one tensor-parallel group are *adjacent* (on a node they share NVLink: TP
communicates every layer, several times), data-parallel peers are `tp` apart, and pipeline
stages are `dp * tp` apart (PP only exchanges activations at stage boundaries, so it may span
nodes). Example, dp=2, tp=2, pp=2 (8 ranks)::

    pp stage 0:  dp0 -> [0 1]   dp1 -> [2 3]        tp groups: [0,1] [2,3] [4,5] [6,7]
    pp stage 1:  dp0 -> [4 5]   dp1 -> [6 7]        dp groups: [0,2] [1,3] [4,6] [5,7]
                                                    pp groups: [0,4] [1,5] [2,6] [3,7]

There is no global singleton: build one `ParallelDims` and hand it (or its groups) to whoever
needs them. At world size 1 nothing touches `torch.distributed` and every group is `None`
(every haillm collective is a no-op on a group of size 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import torch.distributed as dist

__all__ = ["Coords", "ParallelDims"]


class Coords(NamedTuple):
    """Position of one rank in the grid."""

    dp: int
    tp: int
    pp: int


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class ParallelDims:
    """Degrees of data, tensor and pipeline parallelism, and the process groups they need.

    Args:
        dp: data-parallel degree (replicas that see different micro-batches).
        tp: tensor-parallel degree (ranks that split every weight matrix; adjacent ranks).
        pp: pipeline-parallel degree (stages; stage `s` holds ranks `s*dp*tp ... (s+1)*dp*tp-1`).
        world_size: number of ranks to check against; default: `torch.distributed`'s world
            size when initialised, else `dp * tp * pp` (planning without processes).
        rank: this process's global rank; default: `torch.distributed`'s rank, else 0.

    Raises:
        ValueError: a degree is not an integer ≥ 1, or `dp * tp * pp != world_size`.

    Example:
        >>> dims = ParallelDims(dp=1, tp=1, pp=1).build()   # world size 1: no process groups
        >>> dims.coords, dims.is_first_stage, dims.is_last_stage
        (Coords(dp=0, tp=0, pp=0), True, True)
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int | None = None
    rank: int | None = None
    _groups: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} ({v!r}) must be an integer >= 1")
        if self.world_size is None:
            self.world_size = dist.get_world_size() if _dist_ready() else self.dp * self.tp * self.pp
        if self.rank is None:
            self.rank = dist.get_rank() if _dist_ready() else 0
        if self.dp * self.tp * self.pp != self.world_size:
            raise ValueError(
                f"dp * tp * pp ({self.dp} * {self.tp} * {self.pp} = "
                f"{self.dp * self.tp * self.pp}) must equal the world size ({self.world_size})"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank ({self.rank}) must be in [0, world_size={self.world_size})")

    # ------------------------------------------------------------------ grid arithmetic
    def rank_of(self, *, dp: int = 0, tp: int = 0, pp: int = 0) -> int:
        """Global rank at grid position (dp, tp, pp): `pp*(dp_size*tp_size) + dp*tp_size + tp`."""
        for name, v, n in (("dp", dp, self.dp), ("tp", tp, self.tp), ("pp", pp, self.pp)):
            if not 0 <= v < n:
                raise ValueError(f"{name} coordinate ({v}) must be in [0, {n})")
        return pp * (self.dp * self.tp) + dp * self.tp + tp

    def coords_of(self, rank: int) -> Coords:
        """Grid position of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={self.world_size})")
        return Coords(dp=(rank // self.tp) % self.dp, tp=rank % self.tp, pp=rank // (self.tp * self.dp))

    @property
    def coords(self) -> Coords:
        """This rank's (dp, tp, pp) coordinates."""
        return self.coords_of(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def is_first_stage(self) -> bool:
        """True on pipeline stage 0 (it embeds the tokens)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (it computes the loss)."""
        return self.pp_rank == self.pp - 1

    @property
    def pp_prev_rank(self) -> int | None:
        """Global rank of the previous pipeline stage (same dp/tp position); None on stage 0."""
        c = self.coords
        return None if c.pp == 0 else self.rank_of(dp=c.dp, tp=c.tp, pp=c.pp - 1)

    @property
    def pp_next_rank(self) -> int | None:
        """Global rank of the next pipeline stage (same dp/tp position); None on the last."""
        c = self.coords
        return None if c.pp == self.pp - 1 else self.rank_of(dp=c.dp, tp=c.tp, pp=c.pp + 1)

    def ranks_of_group(self, kind: str, rank: int | None = None) -> list[int]:
        """Global ranks of the `kind` group ("dp", "tp", "pp", "mp" = tp×pp, "dp_tp") holding
        `rank` (default: this rank), in group-rank order."""
        c = self.coords_of(self.rank if rank is None else rank)
        if kind == "tp":
            return [self.rank_of(dp=c.dp, tp=t, pp=c.pp) for t in range(self.tp)]
        if kind == "dp":
            return [self.rank_of(dp=d, tp=c.tp, pp=c.pp) for d in range(self.dp)]
        if kind == "pp":
            return [self.rank_of(dp=c.dp, tp=c.tp, pp=p) for p in range(self.pp)]
        if kind == "mp":  # one model replica: every tp and pp rank with this dp index
            return [self.rank_of(dp=c.dp, tp=t, pp=p) for p in range(self.pp) for t in range(self.tp)]
        if kind == "dp_tp":  # one pipeline stage: every dp and tp rank with this pp index
            return [self.rank_of(dp=d, tp=t, pp=c.pp) for d in range(self.dp) for t in range(self.tp)]
        raise ValueError(f"kind ({kind!r}) must be one of 'dp', 'tp', 'pp', 'mp', 'dp_tp'")

    def all_groups(self, kind: str) -> list[list[int]]:
        """Every `kind` group of the grid, in the (deterministic) order `build()` creates them."""
        seen: list[list[int]] = []
        for r in range(self.world_size):
            g = self.ranks_of_group(kind, r)
            if g not in seen:
                seen.append(g)
        return seen

    # ------------------------------------------------------------------ process groups
    _KINDS = ("tp", "dp", "pp", "mp", "dp_tp")

    def build(self, *, backend: str | None = None, timeout: timedelta | None = None) -> ParallelDims:
        """Create the process groups (collective: **every** rank must call it).

        `torch.distributed.new_group` must be entered by all ranks for every group, in the same
        order, even for groups a rank is not part of: we loop over all of them identically.

        Args:
            backend: backend of the new groups (default: the world's, e.g. gloo or nccl).
            timeout: collective timeout of the new groups.

        Returns:
            `self` (so `dims = ParallelDims(tp=2).build()` reads naturally).
        """
        if self.world_size == 1 and not _dist_ready():
            self._groups = {k: None for k in self._KINDS}
            return self
        if not _dist_ready():
            raise RuntimeError(
                f"ParallelDims.build() with world size {self.world_size} needs "
                "torch.distributed.init_process_group() first"
            )
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"ParallelDims(world_size={self.world_size}, rank={self.rank}) does not match "
                f"torch.distributed (world size {dist.get_world_size()}, rank {dist.get_rank()})"
            )
        groups: dict[str, Any] = {}
        for kind in self._KINDS:
            for ranks in self.all_groups(kind):
                g = dist.new_group(ranks=ranks, backend=backend, timeout=timeout)
                if self.rank in ranks:
                    groups[kind] = g
        self._groups = groups
        return self

    def _group(self, kind: str) -> Any:
        if kind not in self._groups:
            raise RuntimeError(f"call ParallelDims.build() before using the {kind} group")
        return self._groups[kind]

    @property
    def built(self) -> bool:
        return bool(self._groups)

    @property
    def tp_group(self) -> Any:
        """Tensor-parallel group (size `tp`); None at world size 1 without torch.distributed."""
        return self._group("tp")

    @property
    def dp_group(self) -> Any:
        """Data-parallel group (size `dp`): gradients are averaged / ZeRO-sharded over it."""
        return self._group("dp")

    @property
    def pp_group(self) -> Any:
        """Pipeline group (size `pp`): the stages one micro-batch flows through."""
        return self._group("pp")

    @property
    def mp_group(self) -> Any:
        """Model-parallel group (tp × pp): all shards of one replica (e.g. global grad norm)."""
        return self._group("mp")

    @property
    def dp_tp_group(self) -> Any:
        """dp × tp ranks of this pipeline stage (e.g. reduce over all copies of a stage)."""
        return self._group("dp_tp")

    def __str__(self) -> str:
        c = self.coords
        return (f"ParallelDims(dp={self.dp}, tp={self.tp}, pp={self.pp}; rank {self.rank} = "
                f"dp{c.dp} tp{c.tp} pp{c.pp})")
