"""The rank grid and the communication regions the parallel model needs.

Rank order (Megatron's): tensor-parallel ranks are adjacent, then data-parallel, then
pipeline stages, i.e. ``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``. TP exchanges
the most bytes (every layer), so its ranks share a node; PP the fewest.

The four autograd regions are Megatron's: ``f`` (`copy_to_tp`: identity forward, all-reduce
backward), ``g`` (`reduce_from_tp`: all-reduce forward, identity backward) and the sequence
parallel pair (`gather_seq`: all-gather along the sequence forward, reduce-scatter backward;
`scatter_seq_reduce`: reduce-scatter forward, all-gather backward). With one TP rank each is
the identity. (`haillm.parallel` teaches the same regions with overlap; the trainer keeps its
own small copy so that it can shard merged QKV/gate-up weights and call the fused GEMMs.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Grid", "all_gather_into", "copy_to_tp", "gather_seq", "reduce_from_tp",
           "reduce_scatter_into", "scatter_seq_reduce"]


def all_gather_into(out: torch.Tensor, inp: torch.Tensor, group=None, async_op=False):
    """`all_gather_into_tensor` under either of torch's names (renamed in torch 2.13)."""
    fn = getattr(dist, "all_gather_into_tensor", None) or dist.all_gather_single
    return fn(out, inp, group=group, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, inp: torch.Tensor, group=None, async_op=False):
    """`reduce_scatter_tensor` (sum) under either of torch's names."""
    fn = getattr(dist, "reduce_scatter_tensor", None) or dist.reduce_scatter_single
    return fn(out, inp, group=group, async_op=async_op)


@dataclass
class Grid:
    """This rank's place in the (pp, dp, tp) grid and its process groups.

    Attributes:
        dp, tp, pp: degrees; rank/world: global; dp_rank, tp_rank, pp_rank: coordinates;
        dp_group, tp_group, pp_group: process groups (None when not distributed).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    rank: int = 0
    world: int = 1
    dp_group: object = None
    tp_group: object = None
    pp_group: object = None
    source: str = "trainer Grid"
    _groups: dict = field(default_factory=dict, repr=False)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_peer(self, delta: int) -> int:
        """Global rank of the same (dp, tp) slot `delta` stages away."""
        return self.rank + delta * self.dp * self.tp

    @classmethod
    def build(cls, dp: int, tp: int, pp: int) -> Grid:
        """Create every group (collectively: all ranks call this in the same order)."""
        if not dist.is_initialized():
            if dp * tp * pp != 1:
                raise RuntimeError("a layout with more than one rank needs torch.distributed")
            return cls()
        world, rank = dist.get_world_size(), dist.get_rank()
        if dp * tp * pp != world:
            raise ValueError(f"dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} != world size {world}")
        g = cls(dp=dp, tp=tp, pp=pp, rank=rank, world=world)
        try:  # the package's grid (same Megatron order) when installed
            from haillm.parallel import ParallelDims
        except ImportError:
            ParallelDims = None
        if ParallelDims is not None:
            dims = ParallelDims(dp=dp, tp=tp, pp=pp).build()
            assert (dims.dp_rank, dims.tp_rank, dims.pp_rank) == (g.dp_rank, g.tp_rank, g.pp_rank)
            g.dp_group, g.tp_group, g.pp_group = dims.dp_group, dims.tp_group, dims.pp_group
            g.source = "haillm.parallel.ParallelDims"
            return g

        def coord(r):
            return r // (tp * dp), (r // tp) % dp, r % tp  # (pp, dp, tp)

        for kind, key in (("tp", lambda c: (c[0], c[1])), ("dp", lambda c: (c[0], c[2])),
                          ("pp", lambda c: (c[1], c[2]))):
            buckets: dict = {}
            for r in range(world):
                buckets.setdefault(key(coord(r)), []).append(r)
            for ranks in buckets.values():
                grp = dist.new_group(ranks)
                if rank in ranks:
                    setattr(g, f"{kind}_group", grp)
        return g


# --------------------------------------------------------------------------- regions
def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _gather_dim1(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    xs = x.transpose(0, 1).contiguous()  # (S/tp, B, ...): the gathered dim must lead
    out = torch.empty((xs.shape[0] * n, *xs.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_into(out, xs, group=group)
    return out.transpose(0, 1)  # (B, S, ...)


def _reduce_scatter_dim1(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    xs = x.transpose(0, 1).contiguous()  # (S, B, ...)
    out = torch.empty((xs.shape[0] // n, *xs.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_into(out, xs, group=group)
    return out.transpose(0, 1).contiguous()  # (B, S/tp, ...)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Megatron ``f``: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron ``g``: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSeq(torch.autograd.Function):
    """SP ``g-bar``: all-gather along the sequence forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_dim1(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_dim1(g, ctx.group), None


class _ScatterSeqReduce(torch.autograd.Function):
    """SP ``f-bar``: reduce-scatter along the sequence forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim1(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim1(g, ctx.group).contiguous(), None


def copy_to_tp(x, group):
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_seq(x, group):
    """(B, S/tp, ...) -> (B, S, ...)."""
    return x if _size(group) == 1 else _GatherSeq.apply(x, group)


def scatter_seq_reduce(x, group):
    """(B, S, ...) partial sums -> (B, S/tp, ...) reduced."""
    return x if _size(group) == 1 else _ScatterSeqReduce.apply(x, group)
