"""One small compatibility layer over torch.distributed's collectives (torch 2.5 → newest).

Why it exists:

* torch ≥ 2.13 renamed the flat-tensor collectives: `all_gather_into_tensor` →
  `all_gather_single` and `reduce_scatter_tensor` → `reduce_scatter_single` (older releases
  only know the first names, and even older ones `_all_gather_base` / `_reduce_scatter_base`).
  We resolve the newest available name once, at import.
* Some gloo builds lack reduce-scatter (and some the flat all-gather). Then we fall back —
  **with a warning**, never silently:
  reduce-scatter → `all_to_all_single` (rank j receives every rank's j-th chunk, the same
  `(t-1)/t · N` bytes as a ring reduce-scatter) followed by a local sum over the `t` chunks;
  all-gather → list `all_gather` + copy into the flat output.
  `impl="fallback"` forces that path (tests use it to prove it equal).
* Degree 1 is a no-op: without `torch.distributed`, or on a group of size 1, nothing is sent.

`group=None` means torch's default (world) group when torch.distributed is initialised, and a
group of size 1 otherwise. Every function takes `async_op`; when True it returns an object with
`.wait()` (a torch `Work`, or a wrapper that finishes the fallback's local step on `wait()`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .trace import current_tracer, trace_work

__all__ = [
    "CompletedWork",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_reduce",
    "group_rank",
    "group_size",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
]

ReduceOp = dist.ReduceOp if dist.is_available() else None


def _resolve(*names: str) -> Callable[..., Any] | None:
    for n in names:
        fn = getattr(dist, n, None)
        if fn is not None:
            return fn
    return None


# Newest name first: the old names emit deprecation warnings on recent torch.
_NATIVE_ALL_GATHER = _resolve("all_gather_single", "all_gather_into_tensor", "_all_gather_base")
_NATIVE_REDUCE_SCATTER = _resolve(
    "reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base"
)


def group_size(group: Any = None) -> int:
    """Number of ranks in `group` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: Any = None) -> int:
    """This rank's index inside `group` (0 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


class CompletedWork:
    """A finished `Work` look-alike, returned for no-op (degree-1) or synchronous fallbacks."""

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _PostWork:
    """Wraps a `Work`; `wait()` waits, then runs the fallback's local finishing step once."""

    def __init__(self, work: Any, post: Callable[[], None]) -> None:
        self._work, self._post, self._done = work, post, False

    def wait(self, timeout: Any = None) -> bool:
        if not self._done:
            self._work.wait()
            self._post()
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done

    def get_future(self) -> Any:
        return self._work.get_future()


def _check_impl(impl: str) -> None:
    if impl not in ("auto", "native", "fallback"):
        raise ValueError(f"impl must be 'auto', 'native' or 'fallback', got {impl!r}")


def _unsupported(err: BaseException) -> bool:
    msg = str(err).lower()
    return isinstance(err, NotImplementedError) or "support" in msg or "not implemented" in msg


def _finish(work: Any, name: str, start: float | None, async_op: bool) -> Any:
    if work is None:
        return CompletedWork() if async_op else None
    if async_op:
        return trace_work(work, name, start)
    work.wait()
    return None


def _start_time() -> float | None:
    tr = current_tracer()
    return None if tr is None else tr.now()


def _record_sync(name: str, start: float | None) -> None:
    tr = current_tracer()
    if tr is not None and start is not None:
        tr.record("comm", name, start, tr.now())


def all_reduce(tensor: torch.Tensor, group: Any = None, *, op: Any = None,
               async_op: bool = False) -> Any:
    """In-place all-reduce (default: sum) of `tensor` over `group`; no-op at degree 1."""
    if group_size(group) == 1:
        return CompletedWork() if async_op else None
    start = _start_time()
    work = dist.all_reduce(tensor, op=op or ReduceOp.SUM, group=group, async_op=async_op)
    if not async_op:
        _record_sync("all_reduce", start)
    return _finish(work, "all_reduce", start, async_op)


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group: Any = None, *,
                           async_op: bool = False, impl: str = "auto") -> Any:
    """Gather every rank's `input` into `output`, concatenated along dim 0 in group-rank order.

    Args:
        output: (t·n, ...) contiguous tensor, written in place.
        input: (n, ...) this rank's piece.
        group: process group of size t.
        async_op: return a handle with `.wait()` instead of blocking.
        impl: "auto" (native, falling back with a warning when unsupported), "native",
            "fallback" (list all-gather + copy).
    """
    _check_impl(impl)
    t = group_size(group)
    if output.shape[0] != t * input.shape[0] or output.shape[1:] != input.shape[1:]:
        raise ValueError(
            f"all_gather: output shape {tuple(output.shape)} must be ({t} * "
            f"{input.shape[0]}, *{tuple(input.shape[1:])}) for input {tuple(input.shape)}"
        )
    if t == 1:
        output.copy_(input)
        return CompletedWork() if async_op else None
    input = input.contiguous()
    start = _start_time()
    if impl != "fallback" and _NATIVE_ALL_GATHER is not None:
        try:
            work = _NATIVE_ALL_GATHER(output, input, group=group, async_op=async_op)
            if not async_op:
                _record_sync("all_gather", start)
            return _finish(work, "all_gather", start, async_op)
        except (RuntimeError, NotImplementedError) as err:
            if impl == "native" or not _unsupported(err):
                raise
            warnings.warn(f"flat all-gather unsupported here ({err}); using list all_gather",
                          RuntimeWarning, stacklevel=2)
    chunks = list(output.chunk(t))
    if all(c.is_contiguous() for c in chunks):
        work = dist.all_gather(chunks, input, group=group, async_op=async_op)
        if not async_op:
            _record_sync("all_gather", start)
        return _finish(work, "all_gather", start, async_op)
    bufs = [torch.empty_like(input) for _ in range(t)]
    work = dist.all_gather(bufs, input, group=group, async_op=True)

    def post() -> None:
        torch.cat(bufs, out=output)

    return _finish_post(work, post, "all_gather", start, async_op)


def _finish_post(work: Any, post: Callable[[], None], name: str, start: float | None,
                 async_op: bool) -> Any:
    if async_op:
        return _PostWork(trace_work(work, name, start), post)
    work.wait()
    post()
    _record_sync(name, start)
    return None


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group: Any = None, *,
                          op: Any = None, async_op: bool = False, impl: str = "auto") -> Any:
    """Reduce (sum) `input` over `group` and keep this rank's dim-0 chunk in `output`.

    Args:
        output: (n, ...) written in place: `sum_over_ranks(input)[rank*n:(rank+1)*n]`.
        input: (t·n, ...) this rank's full-size contribution.
        group: process group of size t.
        op: reduction (default sum; the fallback supports sum only).
        async_op: return a handle with `.wait()` instead of blocking.
        impl: "auto" (native, falling back with a warning when unsupported), "native",
            "fallback" (all_to_all_single + local sum).
    """
    _check_impl(impl)
    t = group_size(group)
    if input.shape[0] != t * output.shape[0] or output.shape[1:] != input.shape[1:]:
        raise ValueError(
            f"reduce_scatter: input shape {tuple(input.shape)} must be ({t} * "
            f"{output.shape[0]}, *{tuple(output.shape[1:])}) for output {tuple(output.shape)}"
        )
    if t == 1:
        output.copy_(input)
        return CompletedWork() if async_op else None
    input = input.contiguous()
    op = op or ReduceOp.SUM
    start = _start_time()
    if impl != "fallback" and _NATIVE_REDUCE_SCATTER is not None:
        try:
            work = _NATIVE_REDUCE_SCATTER(output, input, op=op, group=group, async_op=async_op)
            if not async_op:
                _record_sync("reduce_scatter", start)
            return _finish(work, "reduce_scatter", start, async_op)
        except (RuntimeError, NotImplementedError) as err:
            if impl == "native" or not _unsupported(err):
                raise
            warnings.warn(
                f"reduce_scatter unsupported here ({err}); using all_to_all_single + local sum",
                RuntimeWarning, stacklevel=2,
            )
    if op != ReduceOp.SUM:
        raise NotImplementedError("the reduce_scatter fallback supports op=SUM only")
    # all_to_all: rank j sends its i-th chunk to rank i and receives every rank's j-th chunk.
    received = torch.empty_like(input)  # (t·n, ...): chunk r = rank r's contribution to us
    work = dist.all_to_all_single(received, input, group=group, async_op=True)

    def post() -> None:
        torch.sum(received.view(t, *output.shape), dim=0, out=output)

    return _finish_post(work, post, "reduce_scatter", start, async_op)


# torch ≥ 2.13 spelling, for readers who know the new names.
all_gather_single = all_gather_into_tensor
reduce_scatter_single = reduce_scatter_tensor
