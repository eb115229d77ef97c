"""Communication regions: the conjugate operators of Megatron-LM as small autograd Functions.

Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", section 3) needs exactly two operators
around an MLP or attention block, conjugate to each other:

* **f**: identity in forward, all-reduce in backward: the entry of a column-parallel region.
  Every rank consumes the same input X, but each computes only a slice of the output, so the
  gradient dL/dX is the *sum* of every rank's partial dL/dX.
* **g**: all-reduce in forward, identity in backward: the exit of a row-parallel region. Every
  rank holds a partial sum of the output; after the all-reduce all hold the full output, and
  the incoming gradient is already the same everywhere.

Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", section 4.2.2) splits the all-reduce into its two halves and moves the
LayerNorm/dropout region between them onto sequence shards:

* **g → reduce-scatter** along the sequence in forward (all-gather in backward), and
* **f → all-gather** along the sequence in forward (reduce-scatter in backward).

An all-reduce costs the same bytes as a reduce-scatter plus an all-gather, so SP is free in
communication volume while the activations between the halves shrink by t.

All functions are no-ops (identity) on a group of size 1. Shapes use `t` = group size; the
sequence dimension is `seq_dim` (default 0: Megatron's (s, b, h) layout, in which a sequence
shard is contiguous; any dim works, at the price of a transposed copy).
"""

from __future__ import annotations

from typing import Any

import torch

from .comm import all_gather_into_tensor, all_reduce, group_rank, group_size, reduce_scatter_tensor

__all__ = [
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
]


# ---------------------------------------------------------------------------- plain helpers
def check_divisible(n: int, t: int, what: str) -> int:
    """`n // t`, or a ValueError naming `what`, e.g. `sequence length (7) must be divisible by tp (2)`."""
    if n % t:
        raise ValueError(f"{what} ({n}) must be divisible by tp ({t})")
    return n // t


def _split(x: torch.Tensor, dim: int, group: Any, what: str) -> torch.Tensor:
    t = group_size(group)
    if t == 1:
        return x
    n = check_divisible(x.shape[dim], t, what)
    return x.narrow(dim, group_rank(group) * n, n).contiguous()


def gather_along(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """All-gather `x` along `dim`: (..., n, ...) → (..., t·n, ...), group-rank order."""
    t = group_size(group)
    if t == 1:
        return x
    xs = x.movedim(dim, 0).contiguous()  # (n, ...): collectives concatenate along dim 0
    out = xs.new_empty((t * xs.shape[0], *xs.shape[1:]))
    all_gather_into_tensor(out, xs, group)
    return out.movedim(0, dim)


def reduce_scatter_along(x: torch.Tensor, dim: int, group: Any, what: str) -> torch.Tensor:
    """Sum `x` over the group and keep this rank's slice along `dim`: (t·n, ...) → (n, ...)."""
    t = group_size(group)
    if t == 1:
        return x
    xs = x.movedim(dim, 0).contiguous()
    n = check_divisible(xs.shape[0], t, what)
    out = xs.new_empty((n, *xs.shape[1:]))
    reduce_scatter_tensor(out, xs, group)
    return out.movedim(0, dim)


def _all_reduced(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    all_reduce(x, group)
    return x


_SEQ = "sequence length"
_FEAT = "last dimension"


# ---------------------------------------------------------------------------- tensor parallel
class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Megatron's **f** (`_CopyToModelParallelRegion`): identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduced(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Megatron's **g** (`_ReduceFromModelParallelRegion`): all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduced(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    """Megatron's `_GatherFromModelParallelRegion`: all-gather the last dim forward, split backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_along(x, x.dim() - 1, group).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, grad.dim() - 1, ctx.group, _FEAT), None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    """Megatron's `_ScatterToModelParallelRegion`: keep this rank's last-dim slice forward,
    all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, x.dim() - 1, group, _FEAT)

    @staticmethod
    def backward(ctx, grad):
        return gather_along(grad, grad.dim() - 1, ctx.group).contiguous(), None


# ---------------------------------------------------------------------------- sequence parallel
class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Megatron's `_ScatterToSequenceParallelRegion`: keep this rank's sequence shard forward,
    all-gather backward (enter SP from a replicated tensor, e.g. after the embedding)."""

    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        return _split(x, seq_dim, group, _SEQ)

    @staticmethod
    def backward(ctx, grad):
        return gather_along(grad, ctx.seq_dim, ctx.group), None, None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Megatron's `_GatherFromSequenceParallelRegion` (the SP form of **f**): all-gather along
    the sequence forward; backward reduce-scatters (the consumer is tensor-parallel, so each rank
    holds a partial gradient) or, with `grad_is_partial=False`, just splits."""

    @staticmethod
    def forward(ctx, x, group, seq_dim, grad_is_partial):
        ctx.group, ctx.seq_dim, ctx.partial = group, seq_dim, grad_is_partial
        return gather_along(x, seq_dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return reduce_scatter_along(grad, ctx.seq_dim, ctx.group, _SEQ), None, None, None
        return _split(grad, ctx.seq_dim, ctx.group, _SEQ), None, None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Megatron's `_ReduceScatterToSequenceParallelRegion` (the SP form of **g**): reduce-scatter
    along the sequence forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        return reduce_scatter_along(x, seq_dim, group, _SEQ)

    @staticmethod
    def backward(ctx, grad):
        return gather_along(grad, ctx.seq_dim, ctx.group), None, None


# ---------------------------------------------------------------------------- public functions
def copy_to_tensor_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """**f**: identity forward, all-reduce of the gradient backward. x: any shape."""
    return _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """**g**: all-reduce (sum of partial outputs) forward, identity backward. x: any shape."""
    return _ReduceFromTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """(..., n/t) → (..., n): concatenate every rank's last-dim slice; backward keeps our slice."""
    return _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """(..., n) → (..., n/t): this rank's last-dim slice; backward all-gathers."""
    return _ScatterToTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any = None, *,
                                        seq_dim: int = 0) -> torch.Tensor:
    """(s, ...) → (s/t, ...) along `seq_dim`: this rank's sequence shard; backward all-gathers."""
    return _ScatterToSequenceParallelRegion.apply(x, group, seq_dim % x.dim())


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Any = None, *, seq_dim: int = 0,
                                         grad_is_partial: bool = True) -> torch.Tensor:
    """SP **f**: (s/t, ...) → (s, ...) all-gather along `seq_dim`; backward reduce-scatters the
    gradient (or only splits it when `grad_is_partial=False`)."""
    return _GatherFromSequenceParallelRegion.apply(x, group, seq_dim % x.dim(), grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any = None, *,
                                               seq_dim: int = 0) -> torch.Tensor:
    """SP **g**: (s, ...) partial sums → (s/t, ...) summed shard; backward all-gathers."""
    return _ReduceScatterToSequenceParallelRegion.apply(x, group, seq_dim % x.dim())
