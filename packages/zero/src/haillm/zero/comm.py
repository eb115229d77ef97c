"""The two collectives ZeRO-1 needs, behind one small function each.

* `reduce_scatter_async(bucket, chunk, group)`: sum `bucket` over the group and leave rank r's
  chunk in `chunk` (a view of `bucket`: in place, as Megatron's distributed optimizer does).
* `all_gather_async(bucket, chunk, group)`: the inverse, after the optimizer step.

Both return a handle with `.wait()` (or None when the group has one rank). torch renamed the
tensor collectives in 2.13 (`reduce_scatter_tensor` -> `reduce_scatter_single`, ...); we look
the names up once. Older gloo builds do not implement reduce-scatter at all: there we fall back
to an all-reduce of the whole bucket **with a warning**. The fallback is still asynchronous and
still leaves the right values in the chunk (it leaves them everywhere), but it moves
2(N-1)/N·B elements per rank instead of (N-1)/N·B: twice the traffic of a reduce-scatter.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

__all__ = ["all_gather_async", "group_rank", "group_size", "reduce_scatter_async"]

_RS_NAMES = ("reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base")
_AG_NAMES = ("all_gather_single", "all_gather_into_tensor", "_all_gather_base")
_warned: set[str] = set()


def _first(names: tuple[str, ...]):
    for name in names:
        fn = getattr(dist, name, None)
        if fn is not None:
            return fn
    return None


def group_size(group) -> int:
    """World size of `group` (1 when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside `group` (0 when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def reduce_scatter_async(bucket: torch.Tensor, chunk: torch.Tensor, group=None, *,
                         impl: str = "auto"):
    """Start summing `bucket` (B,) over `group`; rank r's chunk (B/N,) ends up in `chunk`.

    Args:
        bucket: (B,) the flat bucket, B divisible by the group size; overwritten.
        chunk: (B/N,) the view ``bucket[r*B/N:(r+1)*B/N]`` of this rank.
        group: the process group (None: the default group).
        impl: ``"auto"`` (native reduce-scatter, all-reduce fallback with a warning where the
            backend lacks it), ``"reduce_scatter"`` or ``"all_reduce"`` (force one path).

    Returns:
        A work handle (call ``.wait()``), or None for a single rank.
    """
    if impl not in ("auto", "reduce_scatter", "all_reduce"):
        raise ValueError(f"impl must be 'auto', 'reduce_scatter' or 'all_reduce', got {impl!r}")
    if group_size(group) == 1:
        return None
    if impl != "all_reduce":
        fn = _first(_RS_NAMES)
        try:
            if fn is None:
                raise RuntimeError("this torch has no tensor reduce-scatter")
            return fn(chunk, bucket, op=dist.ReduceOp.SUM, group=group, async_op=True)
        except (RuntimeError, NotImplementedError) as e:
            if impl == "reduce_scatter":
                raise
            _warn_once("rs", f"reduce-scatter is not available on backend "
                             f"{dist.get_backend(group)!r} ({e}); falling back to all-reduce "
                             f"(2x the communication volume)")
    return dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_gather_async(bucket: torch.Tensor, chunk: torch.Tensor, group=None):
    """Start gathering every rank's `chunk` (B/N,) into `bucket` (B,) (chunk is a view of it).

    Returns:
        A work handle (call ``.wait()``), or None for a single rank.
    """
    n = group_size(group)
    if n == 1:
        return None
    fn = _first(_AG_NAMES)
    if fn is not None:
        try:
            return fn(bucket, chunk, group=group, async_op=True)
        except (RuntimeError, NotImplementedError) as e:
            _warn_once("ag", f"all_gather_into_tensor failed ({e}); using list all_gather")
    # The list form copies the chunk out first: the output views alias the input otherwise.
    return dist.all_gather(list(bucket.chunk(n)), chunk.clone(), group=group, async_op=True)
