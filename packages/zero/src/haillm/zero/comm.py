"""The collectives of data parallelism, behind one small function each.

* `reduce_scatter_async(bucket, chunk, group)`: sum `bucket` over the group and leave rank r's
  chunk in `chunk` (a view of `bucket`: in place, as Megatron's distributed optimizer does).
* `all_gather_async(bucket, chunk, group)`: the inverse, after the optimizer step.
* `all_reduce_async(bucket, group)`: sum the whole `bucket` on every rank: plain data
  parallelism (``ZeroDataParallel(shard=False)``), where every rank updates every parameter
  and nothing is gathered afterwards.

Both return a handle with `.wait()` (or None when the group has one rank). They delegate to
`haillm.parallel`'s compatibility helpers, which resolve torch's collective names (renamed in
torch 2.13) and fall back **with a warning** where a gloo build lacks reduce-scatter:
`all_to_all_single` + a local sum, the same bytes on the wire as a reduce-scatter but one extra
bucket-sized receive buffer while it is in flight. A second fallback, `"all_reduce"`, needs no
extra buffer but moves 2(N-1)/N·B elements per rank instead of (N-1)/N·B: twice the traffic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from haillm.parallel import all_gather_into_tensor, group_rank, group_size, reduce_scatter_tensor

__all__ = ["REDUCE_SCATTER_IMPLS", "all_gather_async", "all_reduce_async", "group_rank",
           "group_size", "reduce_scatter_async"]

#: "auto": native reduce-scatter, falling back (with a warning) to all-to-all + local sum;
#: "reduce_scatter": native only; "all_to_all": force that fallback; "all_reduce": all-reduce
#: the whole bucket (no extra memory, twice the traffic).
REDUCE_SCATTER_IMPLS = ("auto", "reduce_scatter", "all_to_all", "all_reduce")
_PARALLEL_IMPL = {"auto": "auto", "reduce_scatter": "native", "all_to_all": "fallback"}


def reduce_scatter_async(bucket: torch.Tensor, chunk: torch.Tensor, group=None, *,
                         impl: str = "auto"):
    """Start summing `bucket` (B,) over `group`; rank r's chunk (B/N,) ends up in `chunk`.

    Args:
        bucket: (B,) the flat bucket, B divisible by the group size N.
        chunk: (B/N,) the view ``bucket[r*B/N:(r+1)*B/N]`` of this rank.
        group: the process group (None: the default group).
        impl: one of `REDUCE_SCATTER_IMPLS`.

    Returns:
        A work handle (call ``.wait()``), or None for a single rank.
    """
    if impl not in REDUCE_SCATTER_IMPLS:
        raise ValueError(f"impl must be one of {REDUCE_SCATTER_IMPLS}, got {impl!r}")
    if group_size(group) == 1:
        return None
    if impl == "all_reduce":
        return dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return reduce_scatter_tensor(chunk, bucket, group, async_op=True, impl=_PARALLEL_IMPL[impl])


def all_gather_async(bucket: torch.Tensor, chunk: torch.Tensor, group=None):
    """Start gathering every rank's `chunk` (B/N,) into `bucket` (B,) (chunk is a view of it).

    Returns:
        A work handle (call ``.wait()``), or None for a single rank.
    """
    if group_size(group) == 1:
        return None
    return all_gather_into_tensor(bucket, chunk, group, async_op=True)


def all_reduce_async(bucket: torch.Tensor, group=None):
    """Start summing `bucket` (B,) over `group`, in place, on every rank.

    A ring all-reduce is a reduce-scatter followed by an all-gather: 2(N-1)/N·B elements per
    rank on the wire, as many as ZeRO-1's gradient reduce-scatter and parameter all-gather
    together (in bytes more when the parameters are bf16: the all-gather then moves 2 bytes
    per element, this one 4).

    Returns:
        A work handle (call ``.wait()``), or None for a single rank.
    """
    if group_size(group) == 1:
        return None
    return dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=group, async_op=True)
