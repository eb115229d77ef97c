"""`Shard`: how one parameter is split over the TP group (the rule, as data).

The one place where a sharding rule is written down: the layers' `from_full`, the shard plan
(`haillm.parallel.plan`), checkpoint resharding and the exporters all slice and gather with it.
Merged projections (Q, K, V of unequal widths under GQA; gate and up) are one parameter with
several *parts*: a column rule cuts every part separately, so rank r holds ``[Q_r, K_r, V_r]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .comm import group_size
from .mappings import check_divisible

__all__ = ["KINDS", "Shard"]

KINDS = ("column", "row", "vocab", "replicated")


@dataclass(frozen=True)
class Shard:
    """How one parameter is split over t TP ranks.

    Args:
        kind: ``column`` (rows of an (out, in) weight: dim 0), ``row`` (columns: dim 1),
            ``vocab`` (rows of an embedding table or LM head: dim 0), ``replicated``.
        parts: widths of the merged parts along dim 0 (column only), e.g. ``(q, kv, kv)``;
            empty: one part.
    """

    kind: str
    parts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Shard kind ({self.kind!r}) must be one of {KINDS}")
        if self.parts and self.kind != "column":
            raise ValueError(f"parts are for column shards only, got kind {self.kind!r}")

    @property
    def dim(self) -> int | None:
        """The split dimension (None: replicated)."""
        return {"column": 0, "vocab": 0, "row": 1}.get(self.kind)

    def _parts(self, shape: Sequence[int]) -> list[int]:
        n = shape[0] if self.dim == 0 else 0
        parts = list(self.parts) or [n]
        if self.dim == 0 and sum(parts) != n:
            raise ValueError(f"parts {parts} must sum to dim 0 of the tensor ({n})")
        return parts

    def local_shape(self, shape: Sequence[int], tp: int) -> tuple[int, ...]:
        """Shape of one rank's slice of a full tensor of `shape`."""
        shape = tuple(shape)
        if self.dim is None or tp == 1:
            return shape
        out = list(shape)
        if self.dim == 0:
            out[0] = sum(check_divisible(p, tp, "a merged part" if self.parts else "dim 0")
                         for p in self._parts(shape))
        else:
            out[1] = check_divisible(shape[1], tp, "dim 1")
        return tuple(out)

    def slices(self, shape: Sequence[int], rank: int, tp: int) -> list[tuple[slice, ...]]:
        """Index ranges of the full tensor that rank `rank` of `tp` holds, in its local order
        (one per part; concatenated along `dim` they are the local tensor)."""
        shape = tuple(shape)
        everything = tuple(slice(0, n) for n in shape)
        if self.dim is None or tp == 1:
            return [everything]
        if self.dim == 1:
            w = check_divisible(shape[1], tp, "dim 1")
            return [(slice(0, shape[0]), slice(rank * w, (rank + 1) * w), *everything[2:])]
        out, start = [], 0
        for p in self._parts(shape):
            w = check_divisible(p, tp, "a merged part" if self.parts else "dim 0")
            out.append((slice(start + rank * w, start + (rank + 1) * w), *everything[1:]))
            start += p
        return out

    def local(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """This rank's slice of `full`: a new contiguous tensor when it is a real slice (never
        a view that would keep the full tensor alive), `full` itself when nothing is cut."""
        if self.dim is None or tp == 1:
            return full
        pieces = [full[s] for s in self.slices(full.shape, rank, tp)]
        if len(pieces) == 1:  # a copy: a view would keep the whole tensor alive
            return pieces[0].contiguous().clone()
        return torch.cat(pieces, dim=self.dim)

    def full(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's slice (in rank order): the inverse of `local`."""
        shards = list(shards)
        if self.dim is None or len(shards) == 1:
            return shards[0]
        if self.dim == 1:
            return torch.cat(shards, dim=1)
        tp = len(shards)
        local_parts = [p // tp for p in self.parts] or [shards[0].shape[0]]
        per_rank = [s.split(local_parts, dim=0) for s in shards]
        return torch.cat([per_rank[r][i] for i in range(len(local_parts)) for r in range(tp)])

    def gather(self, local: torch.Tensor, group: Any = None) -> torch.Tensor:
        """The full tensor from this rank's slice (collective over `group`, the TP group)."""
        t = group_size(group)
        if self.dim is None or t == 1:
            return local
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(t)]
        dist.all_gather(shards, local, group=group)
        return self.full(shards)
