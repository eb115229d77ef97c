"""The rank grid: which rank does which slice of data, tensor, context and pipeline parallelism.

`ParallelDims(dp, tp, pp, cp)` lays the `world_size = dp * cp * tp * pp` ranks out as a grid in
the Megatron-LM order, **TP fastest, then CP, then DP, then PP**:

    global_rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

With cp = 1 (the default) this is the 3-D grid `pp_rank * (dp * tp) + dp_rank * tp + tp_rank`.

so the `tp` ranks of one tensor-parallel group are *adjacent* (on a node they share NVLink: TP
communicates every layer, several times), data-parallel peers are `tp` apart, and pipeline
stages are `dp * tp` apart (PP only exchanges activations at stage boundaries, so it may span
nodes). The `cp` ranks of a context-parallel group (one sequence, split by
`split_sequence`; ring attention passes K/V between them every layer) sit between TP and DP.
Parameters are replicated over dp × cp, so their gradients reduce over the `dp_cp` group
(and ZeRO-1 shards over it), as in Megatron-core. Example, dp=2, tp=2, pp=2 (8 ranks)::

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
    """Position of one rank in the grid (its cp coordinate: `ParallelDims.cp_rank_of`)."""

    dp: int
    tp: int
    pp: int


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class ParallelDims:
    """Degrees of data, tensor, pipeline and context parallelism, and their process groups.

    Args:
        dp: data-parallel degree (replicas that see different micro-batches).
        tp: tensor-parallel degree (ranks that split every weight matrix; adjacent ranks).
        pp: pipeline-parallel degree (stages; stage `s` holds ranks
            `s*dp*cp*tp ... (s+1)*dp*cp*tp-1`).
        cp: context-parallel degree (ranks that split one sequence; ring attention), `tp`
            ranks apart.
        world_size: number of ranks to check against; default: `torch.distributed`'s world
            size when initialised, else `dp * cp * tp * pp` (planning without processes).
        rank: this process's global rank; default: `torch.distributed`'s rank, else 0.

    Raises:
        ValueError: a degree is not an integer ≥ 1, or `dp * cp * tp * pp != world_size`.

    Example:
        >>> dims = ParallelDims(dp=1, tp=1, pp=1).build()   # world size 1: no process groups
        >>> dims.coords, dims.is_first_stage, dims.is_last_stage
        (Coords(dp=0, tp=0, pp=0), True, True)
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    world_size: int | None = None
    rank: int | None = None
    _groups: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "cp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} ({v!r}) must be an integer >= 1")
        n = self.dp * self.cp * self.tp * self.pp
        if self.world_size is None:
            self.world_size = dist.get_world_size() if _dist_ready() else n
        if self.rank is None:
            self.rank = dist.get_rank() if _dist_ready() else 0
        if n != self.world_size:
            if self.cp == 1:
                raise ValueError(
                    f"dp * tp * pp ({self.dp} * {self.tp} * {self.pp} = {n}) must equal the "
                    f"world size ({self.world_size})")
            raise ValueError(
                f"dp * cp * tp * pp ({self.dp} * {self.cp} * {self.tp} * {self.pp} = {n}) must "
                f"equal the world size ({self.world_size})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank ({self.rank}) must be in [0, world_size={self.world_size})")

    # ------------------------------------------------------------------ grid arithmetic
    def rank_of(self, *, dp: int = 0, tp: int = 0, pp: int = 0, cp: int = 0) -> int:
        """Global rank at grid position (dp, tp, pp, cp):
        `pp*(dp_size*cp_size*tp_size) + dp*(cp_size*tp_size) + cp*tp_size + tp`."""
        for name, v, n in (("dp", dp, self.dp), ("tp", tp, self.tp), ("pp", pp, self.pp),
                           ("cp", cp, self.cp)):
            if not 0 <= v < n:
                raise ValueError(f"{name} coordinate ({v}) must be in [0, {n})")
        return pp * (self.dp * self.cp * self.tp) + dp * (self.cp * self.tp) + cp * self.tp + tp

    def coords_of(self, rank: int) -> Coords:
        """Grid position (dp, tp, pp) of a global rank; its cp coordinate is `cp_rank_of`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={self.world_size})")
        ct = self.cp * self.tp
        return Coords(dp=(rank // ct) % self.dp, tp=rank % self.tp, pp=rank // (ct * self.dp))

    def cp_rank_of(self, rank: int) -> int:
        """Context-parallel coordinate of a global rank (0 when cp = 1)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={self.world_size})")
        return (rank // self.tp) % self.cp

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
    def cp_rank(self) -> int:
        """This rank's index in its context-parallel group (the shard of the sequence it holds)."""
        return self.cp_rank_of(self.rank)

    @property
    def cp_size(self) -> int:
        return self.cp

    @property
    def dp_cp_rank(self) -> int:
        """This rank's index in its dp × cp group (`dp_rank * cp + cp_rank`)."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def dp_cp_size(self) -> int:
        return self.dp * self.cp

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
        """Global rank of the previous pipeline stage (same dp/cp/tp position); None on stage 0."""
        c = self.coords
        return None if c.pp == 0 else self.rank_of(dp=c.dp, tp=c.tp, pp=c.pp - 1, cp=self.cp_rank)

    @property
    def pp_next_rank(self) -> int | None:
        """Global rank of the next pipeline stage (same dp/cp/tp position); None on the last."""
        c = self.coords
        return (None if c.pp == self.pp - 1
                else self.rank_of(dp=c.dp, tp=c.tp, pp=c.pp + 1, cp=self.cp_rank))

    def ranks_of_group(self, kind: str, rank: int | None = None) -> list[int]:
        """Global ranks of the `kind` group holding `rank` (default: this rank), in group-rank
        order. Kinds: "dp", "tp", "pp", "cp", "mp" (tp × pp: one model replica), "dp_tp" (dp × tp
        ranks of one pipeline stage, at one cp index), "dp_cp" (dp × cp: the ranks that hold the
        same parameter shard; gradients reduce over it)."""
        r = self.rank if rank is None else rank
        c, x = self.coords_of(r), self.cp_rank_of(r)
        at = lambda dp=c.dp, tp=c.tp, pp=c.pp, cp=x: self.rank_of(dp=dp, tp=tp, pp=pp, cp=cp)
        if kind == "tp":
            return [at(tp=t) for t in range(self.tp)]
        if kind == "dp":
            return [at(dp=d) for d in range(self.dp)]
        if kind == "pp":
            return [at(pp=p) for p in range(self.pp)]
        if kind == "cp":
            return [at(cp=k) for k in range(self.cp)]
        if kind == "mp":  # one model replica: every tp and pp rank with this dp (and cp) index
            return [at(tp=t, pp=p) for p in range(self.pp) for t in range(self.tp)]
        if kind == "dp_tp":  # one pipeline stage: every dp and tp rank with this pp (cp) index
            return [at(dp=d, tp=t) for d in range(self.dp) for t in range(self.tp)]
        if kind == "dp_cp":  # one parameter shard's copies: every dp and cp rank, rank order
            return [at(dp=d, cp=k) for d in range(self.dp) for k in range(self.cp)]
        raise ValueError(
            f"kind ({kind!r}) must be one of 'dp', 'tp', 'pp', 'cp', 'mp', 'dp_tp', 'dp_cp'")

    def all_groups(self, kind: str) -> list[list[int]]:
        """Every `kind` group of the grid, in the (deterministic) order `build()` creates them."""
        seen: list[list[int]] = []
        for r in range(self.world_size):
            g = self.ranks_of_group(kind, r)
            if g not in seen:
                seen.append(g)
        return seen

    # ------------------------------------------------------------------ process groups
    _KINDS = ("tp", "dp", "pp", "mp", "dp_tp", "cp", "dp_cp")

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
    def cp_group(self) -> Any:
        """Context-parallel group (size `cp`): the ranks that share one sequence (ring
        attention's ring; `split_sequence`, `context_parallel_attention` take it)."""
        return self._group("cp")

    @property
    def dp_cp_group(self) -> Any:
        """dp × cp group: parameters are replicated over it, so gradients reduce (and ZeRO-1
        shards) over it; equal to the dp group when cp = 1."""
        return self._group("dp_cp")

    @property
    def dp_tp_group(self) -> Any:
        """dp × tp ranks of this pipeline stage (e.g. reduce over all copies of a stage)."""
        return self._group("dp_tp")

    def __str__(self) -> str:
        c = self.coords
        if self.cp == 1:
            return (f"ParallelDims(dp={self.dp}, tp={self.tp}, pp={self.pp}; rank {self.rank} = "
                    f"dp{c.dp} tp{c.tp} pp{c.pp})")
        return (f"ParallelDims(dp={self.dp}, tp={self.tp}, pp={self.pp}, cp={self.cp}; rank "
                f"{self.rank} = dp{c.dp} cp{self.cp_rank} tp{c.tp} pp{c.pp})")
