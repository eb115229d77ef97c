"""ColumnParallelLinear and RowParallelLinear, with their communication overlapped.

Megatron-LM's split of `Y = X Wᵀ + b` (W: (out, in), nn.Linear layout) over t ranks:

* **column parallel**: W split by output rows, W_r: (out/t, in). Rank r computes Y_r = X W_rᵀ,
  its slice of the output features. Input: replicated X (region entered through **f**) or,
  under sequence parallelism, a sequence shard that is all-gathered first.
* **row parallel**: W split by input columns, W_r: (out, in/t). Rank r multiplies its slice of
  the input features, X_r W_rᵀ, a partial sum of Y; the sum happens in **g** (all-reduce), or
  under sequence parallelism in a reduce-scatter along the sequence. The bias is added once,
  after the sum.

Teaching version: `mappings.copy_to_tensor_parallel_region(x) @ W_r.T` and
`reduce_from_tensor_parallel_region(x_r @ W_r.T) + b`: correct, nothing overlapped. The
Functions below are the real ones: they add
(1) in the column backward, the input-gradient all-reduce (or reduce-scatter) runs
    asynchronously while the weight-gradient GEMM computes (Megatron's
    `async_tensor_model_parallel_allreduce`); under SP the input's all-gather for the weight
    gradient is likewise hidden behind the input-gradient GEMM (Megatron re-gathers X in
    backward instead of keeping the full sequence: that is the point of SP's memory saving);
(2) under SP, the all-gather before the column GEMM and the reduce-scatter after the row GEMM
    are chunked along the sequence and pipelined (see `overlap.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .comm import all_gather_into_tensor, all_reduce, group_rank, group_size, reduce_scatter_tensor
from .mappings import (
    _SEQ,
    check_divisible,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .overlap import gather_matmul, matmul_reduce_scatter
from .shard import Shard
from .trace import span

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # (tokens, features)


def _weight_grad(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with span("compute", "gemm dW"):
        return _flat(grad_y).t().mm(_flat(x))  # (out, tokens) @ (tokens, in) = (out, in)


class _ColumnParallelLinearFn(torch.autograd.Function):
    """Y = gather_seq(X) Wᵀ + b under SP, else f(X) Wᵀ + b; the backward overlaps comm."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, sp, seq_dim, overlap_grad, chunks):
        ctx.group, ctx.sp, ctx.seq_dim = group, sp, seq_dim
        ctx.overlap_grad, ctx.chunks, ctx.has_bias = overlap_grad, chunks, bias is not None
        ctx.save_for_backward(x, weight)  # under SP: only the local shard (memory / t)
        if not sp:
            with span("compute", "gemm fwd"):
                return F.linear(x, weight, bias)
        xs = x.movedim(seq_dim, 0)  # (s/t, ..., in)
        y, _ = gather_matmul(xs, lambda a: F.linear(a, weight, bias), group, chunks=chunks,
                             name="gemm fwd")
        return y.movedim(0, seq_dim)  # (..., s, ..., out/t)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        group, async_op = ctx.group, ctx.overlap_grad
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = grad_b = None
        if not ctx.sp:
            if need_x:
                with span("compute", "gemm dX"):
                    grad_x = grad_y.matmul(weight)  # (..., in): a partial sum on every rank
                handle = all_reduce(grad_x, group, async_op=async_op)  # f's backward
            if need_w:
                grad_w = _weight_grad(grad_y, x)  # runs while the all-reduce is in flight
            if need_x and async_op:
                handle.wait()
        else:
            t = group_size(group)
            gy = grad_y.movedim(ctx.seq_dim, 0).contiguous()  # (s, ..., out/t)
            xs = x.movedim(ctx.seq_dim, 0).contiguous()  # (s/t, ..., in)
            x_full = xs.new_empty((t * xs.shape[0], *xs.shape[1:]))
            gather = None
            if need_w:  # re-gather X (async), hidden behind the dX GEMM below
                gather = all_gather_into_tensor(x_full, xs, group, async_op=async_op)
            if need_x:
                if ctx.chunks > 1:  # pipelined dX GEMM → reduce-scatter
                    gxs = matmul_reduce_scatter(gy, lambda g: g.matmul(weight), group,
                                                chunks=ctx.chunks, name="gemm dX")
                    handle = None
                else:
                    with span("compute", "gemm dX"):
                        gx_full = gy.matmul(weight)  # (s, ..., in) partial sums
                    gxs = gx_full.new_empty(xs.shape)
                    if gather is not None:
                        gather.wait()
                    handle = reduce_scatter_tensor(gxs, gx_full, group, async_op=async_op)
            if need_w:
                if gather is not None:
                    gather.wait()
                grad_w = _weight_grad(gy, x_full)  # runs while the reduce-scatter is in flight
            if need_x:
                if handle is not None:
                    handle.wait()
                grad_x = gxs.movedim(0, ctx.seq_dim)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = _flat(grad_y).sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _RowParallelLinearFn(torch.autograd.Function):
    """Y = g(X_r W_rᵀ) + b, or reduce_scatter_seq(X_r W_rᵀ) + b under SP."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, sp, seq_dim, chunks):
        ctx.group, ctx.sp, ctx.seq_dim, ctx.chunks = group, sp, seq_dim, chunks
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        if not sp:
            with span("compute", "gemm fwd"):
                y = F.linear(x, weight)  # partial sums
            all_reduce(y, group)  # g
        else:
            xs = x.movedim(seq_dim, 0)  # (s, ..., in/t)
            check_divisible(xs.shape[0], group_size(group), _SEQ)
            y = matmul_reduce_scatter(xs, lambda a: F.linear(a, weight), group, chunks=chunks,
                                      name="gemm fwd").movedim(0, seq_dim)  # (s/t, ..., out)
        if bias is not None:
            y = y + bias  # once, after the sum
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if not ctx.sp:
            gy_full = grad_y  # g's backward: identity
            if ctx.needs_input_grad[0]:
                with span("compute", "gemm dX"):
                    grad_x = grad_y.matmul(weight)
        else:
            gys = grad_y.movedim(ctx.seq_dim, 0)  # (s/t, ..., out)
            mm = (lambda g: g.matmul(weight)) if ctx.needs_input_grad[0] else (lambda g: g)
            gx, gy_full = gather_matmul(gys, mm, ctx.group, chunks=ctx.chunks,
                                        keep_gathered=True, name="gemm dX")
            if ctx.needs_input_grad[0]:
                grad_x = gx.movedim(0, ctx.seq_dim)
            x = x.movedim(ctx.seq_dim, 0)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(gy_full, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # Under SP the gathered gradient covers the full sequence, so this sum is complete
            # on every rank: no extra all-reduce for the (replicated) bias.
            grad_b = _flat(gy_full).sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for x's device if autocast is on there, else None."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    get = getattr(torch, "get_autocast_dtype", None)  # torch >= 2.4
    if get is not None:
        return get(dev)
    return torch.get_autocast_gpu_dtype() if dev == "cuda" else torch.get_autocast_cpu_dtype()


def _apply(fn: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           *args: Any) -> torch.Tensor:
    """Run a linear Function like `nn.Linear` under autocast: cast x, W, b to the autocast dtype
    (differentiable casts: fp32 parameters get fp32 gradients) and run the Function with
    autocast off, so forward and backward GEMMs see one dtype."""
    dt = _autocast_dtype(x)
    if dt is None:
        return fn.apply(x, weight, bias, *args)
    x, weight = x.to(dt), weight.to(dt)
    bias = bias.to(dt) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return fn.apply(x, weight, bias, *args)


def _init_linear_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    # nn.Linear's default init, with the fan-in of the *full* layer: U(-1/sqrt(in), 1/sqrt(in)).
    if weight.is_meta:  # structure only: the values come later (e.g. from a shard plan)
        return
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        nn.init.uniform_(weight, -bound, bound)
        if bias is not None:
            nn.init.uniform_(bias, -bound, bound)


class ColumnParallelLinear(nn.Module):
    """`Y = X Wᵀ + b` with W split by output features: this rank holds W_r (out/t, in).

    Args:
        in_features: input features (full).
        out_features: output features (full); divisible by t (each part, see `partition_sizes`).
        bias: learn a bias (split like the outputs).
        gather_output: all-gather the output features at the end, (..., out), instead of
            returning this rank's (..., out/t).
        sequence_parallel: the input is a sequence shard (s/t along `seq_dim`), all-gathered
            before the GEMM (SP's **f**); the output covers the full sequence.
        group: TP process group (None: the default group, or size 1 without torch.distributed).
        seq_dim: sequence dimension of the input (default 0, Megatron's (s, b, h) layout).
        overlap_grad_comm: backward: run the input-gradient all-reduce / reduce-scatter
            asynchronously behind the weight-gradient GEMM (results identical either way).
        overlap_sp_comm: SP only: pipeline the all-gather with the GEMM in `sp_chunks` chunks.
        sp_chunks: pipeline depth for `overlap_sp_comm` (reduced to a divisor of s/t).
        partition_sizes: merged projections, e.g. `[q, k, v]` or `[gate, up]`: the output is
            the concatenation of parts, each split separately over the ranks, so the local
            output is `[q/t, k/t, v/t]` (use `.split_output`). Default: one part.
        device: of the parameters.
        dtype: of the parameters.

    Shapes:
        x: (..., in) replicated, or under SP (.., s/t, .., in) with the shard along `seq_dim`.
        returns: (..., out/t) (or (..., out) with `gather_output`); under SP the sequence dim
        is s.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, group: Any = None,
                 seq_dim: int = 0, overlap_grad_comm: bool = True, overlap_sp_comm: bool = False,
                 sp_chunks: int = 4, partition_sizes: Sequence[int] | None = None,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        t = group_size(group)
        parts = list(partition_sizes) if partition_sizes is not None else [out_features]
        if sum(parts) != out_features:
            raise ValueError(f"partition_sizes {parts} must sum to out_features ({out_features})")
        for i, p in enumerate(parts):
            what = "out_features" if len(parts) == 1 else f"partition_sizes[{i}]"
            check_divisible(p, t, what)
        if sequence_parallel and gather_output:
            raise ValueError("gather_output=True cannot be combined with sequence_parallel=True")
        self.in_features, self.out_features, self.tp = in_features, out_features, t
        self.partition_sizes = parts
        self.local_partition_sizes = [p // t for p in parts]
        self.gather_output, self.sequence_parallel, self.group = gather_output, sequence_parallel, group
        self.seq_dim, self.overlap_grad_comm = seq_dim, overlap_grad_comm
        self.overlap_sp_comm, self.sp_chunks = overlap_sp_comm, sp_chunks
        fk = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features // t, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(out_features // t, **fk)) if bias else None
        _init_linear_(self.weight, self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim ({x.shape[-1]}) must equal in_features ({self.in_features})")
        seq_dim = self.seq_dim % x.dim()
        chunks = self.sp_chunks if (self.sequence_parallel and self.overlap_sp_comm) else 1
        y = _apply(_ColumnParallelLinearFn, x, self.weight, self.bias, self.group,
                   self.sequence_parallel, seq_dim, self.overlap_grad_comm, chunks)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.group)
            if len(self.partition_sizes) > 1:  # (p0/t, p1/t, ...) per rank → (p0, p1, ...)
                t = self.tp
                pieces = y.split(self.local_partition_sizes * t, dim=-1)
                y = torch.cat([pieces[r * len(self.partition_sizes) + i]
                               for i in range(len(self.partition_sizes)) for r in range(t)], -1)
        return y

    def input_region(self, x: torch.Tensor) -> torch.Tensor:
        """The input as this layer's GEMM reads it: all-gathered along `seq_dim` under SP,
        else through Megatron's f (identity forward, all-reduce backward). For callers that
        fuse the GEMM with its epilogue (`haillm.fusedops.linear_swiglu(region(x), weight)`),
        at the price of the overlap that `forward` adds."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(x, self.group,
                                                        seq_dim=self.seq_dim % x.dim())
        return copy_to_tensor_parallel_region(x, self.group)

    def split_output(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a local (non-gathered) output into its parts, e.g. (q_r, k_r, v_r)."""
        return y.split(self.local_partition_sizes, dim=-1)

    @classmethod
    def from_full(cls, module: nn.Linear, *, group: Any = None, **kw: Any) -> ColumnParallelLinear:
        """Shard an `nn.Linear` that every rank holds identically: keep rows `.chunk(t)[r]`
        (of each part when `partition_sizes` is given)."""
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    group=group, device=module.weight.device, dtype=module.weight.dtype, **kw)
        r, t = group_rank(group), layer.tp
        rule = Shard("column", tuple(layer.partition_sizes))  # every part cut separately
        with torch.no_grad():
            layer.weight.copy_(rule.local(module.weight, r, t))
            if module.bias is not None:
                layer.bias.copy_(rule.local(module.bias, r, t))
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), tp={self.tp}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """`Y = X Wᵀ + b` with W split by input features: this rank holds W_r (out, in/t).

    Args:
        in_features: input features (full); divisible by t.
        out_features: output features (full).
        bias: learn a bias (replicated; added once, after the reduction).
        input_is_parallel: the input is already split by features (..., in/t), e.g. the output
            of a ColumnParallelLinear; if False, this rank's slice is taken from (..., in).
        sequence_parallel: reduce-scatter the output along `seq_dim` (SP's **g**) instead of
            all-reducing it: the output is this rank's sequence shard.
        group: TP process group.
        seq_dim: sequence dimension (default 0).
        overlap_sp_comm: SP only: pipeline the GEMM with the reduce-scatter (and, in backward,
            the gradient's all-gather with the input-gradient GEMM) in `sp_chunks` chunks.
        sp_chunks: pipeline depth (reduced to a divisor of s/t).
        device: of the parameters.
        dtype: of the parameters.

    Shapes:
        x: (..., in/t) (full sequence).
        returns: (..., out) replicated, or under SP (.., s/t, .., out).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 group: Any = None, seq_dim: int = 0, overlap_sp_comm: bool = False,
                 sp_chunks: int = 4, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        t = group_size(group)
        check_divisible(in_features, t, "in_features")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel=True needs input_is_parallel=True")
        self.in_features, self.out_features, self.tp = in_features, out_features, t
        self.input_is_parallel, self.sequence_parallel, self.group = (
            input_is_parallel, sequence_parallel, group)
        self.seq_dim, self.overlap_sp_comm, self.sp_chunks = seq_dim, overlap_sp_comm, sp_chunks
        fk = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features // t, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        _init_linear_(self.weight, self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            if x.shape[-1] != self.in_features:
                raise ValueError(
                    f"input last dim ({x.shape[-1]}) must equal in_features ({self.in_features})")
            x = scatter_to_tensor_parallel_region(x, self.group)
        elif x.shape[-1] != self.in_features // self.tp:
            raise ValueError(f"input last dim ({x.shape[-1]}) must equal in_features / tp "
                             f"({self.in_features} / {self.tp} = {self.in_features // self.tp})")
        chunks = self.sp_chunks if (self.sequence_parallel and self.overlap_sp_comm) else 1
        return _apply(_RowParallelLinearFn, x, self.weight, self.bias, self.group,
                      self.sequence_parallel, self.seq_dim % x.dim(), chunks)

    @classmethod
    def from_full(cls, module: nn.Linear, *, group: Any = None, **kw: Any) -> RowParallelLinear:
        """Shard an `nn.Linear` every rank holds identically: keep columns `.chunk(t, dim=1)[r]`;
        the bias is copied whole."""
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    group=group, device=module.weight.device, dtype=module.weight.dtype, **kw)
        with torch.no_grad():
            layer.weight.copy_(Shard("row").local(module.weight, group_rank(group), layer.tp))
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), "
                f"out_features={self.out_features}, tp={self.tp}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")
