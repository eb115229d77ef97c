"""Pipelined all-gather → GEMM and GEMM → reduce-scatter along the sequence (SP overlap).

Under sequence parallelism a column-parallel GEMM needs the *whole* sequence: plainly, one
all-gather, then the GEMM, with the cores idle during the gather. Here the local shard is cut
into `c` chunks along the sequence and chunk k+1 is gathered (asynchronously) while the GEMM of
chunk k runs; after a row-parallel GEMM, the reduce-scatter of chunk k runs while chunk k+1 is
multiplied. (The same idea as Wang et al. 2022 "Overlap communication with dependent
computation via decomposition", and Megatron/TransformerEngine's userbuffers "comm overlap".)

Layout. Rank r owns rows `[r·n, (r+1)·n)` of the sequence (n = s/t). Chunk k of every rank is
rows `r·n + k·m ... r·n + (k+1)·m` (m = n/c); gathering chunk k from all ranks yields a
(t·m, ...) block whose rows land at positions `(r, k, i)` of the output viewed as (t, c, m, ...).
So the result is bit-for-bit what one gather + one GEMM gives (GEMMs are row-independent).

With `chunks=1` both functions are the plain, non-overlapped sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .comm import all_gather_into_tensor, group_size, reduce_scatter_tensor
from .trace import span

__all__ = ["effective_chunks", "gather_matmul", "matmul_reduce_scatter"]

MatMul = Callable[[torch.Tensor], torch.Tensor]


def effective_chunks(n: int, chunks: int) -> int:
    """Largest c ≤ `chunks` that divides the shard length `n` (so every chunk is the same size)."""
    c = max(1, min(chunks, n))
    while n % c:
        c -= 1
    return c


def gather_matmul(x_shard: torch.Tensor, mm: MatMul, group: Any, *, chunks: int = 1,
                  keep_gathered: bool = False, name: str = "gemm"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`mm(all_gather(x_shard))`, the gather of chunk k+1 overlapped with `mm` of chunk k.

    Args:
        x_shard: (n, ...) this rank's sequence shard (sequence first).
        mm: row-wise map (rows, ..., k) → (rows, ..., o), e.g. `lambda a: a @ W.T`.
        group: the TP group (size t).
        chunks: pipeline depth c (1 = gather everything, then one GEMM).
        keep_gathered: also return the gathered input (t·n, ...).
        name: label of the GEMM events in a `Tracer`.

    Returns:
        (y, gathered): y (t·n, ..., o); gathered (t·n, ...) or None.
    """
    t = group_size(group)
    n = x_shard.shape[0]
    c = effective_chunks(n, chunks)
    x_shard = x_shard.contiguous()
    if c == 1:
        full = x_shard.new_empty((t * n, *x_shard.shape[1:]))
        all_gather_into_tensor(full, x_shard, group)
        with span("compute", name):
            y = mm(full)
        return y, (full if keep_gathered else None)
    m = n // c
    rest = x_shard.shape[1:]
    bufs = [x_shard.new_empty((t * m, *rest)) for _ in range(c)]
    handles: list[Any] = [None] * c
    handles[0] = all_gather_into_tensor(bufs[0], x_shard[:m], group, async_op=True)
    y = gathered = None
    for k in range(c):
        if k + 1 < c:  # start the next chunk's communication before this chunk's GEMM
            handles[k + 1] = all_gather_into_tensor(
                bufs[k + 1], x_shard[(k + 1) * m:(k + 2) * m], group, async_op=True)
        handles[k].wait()
        with span("compute", name):
            yk = mm(bufs[k])  # (t·m, ..., o)
        if y is None:
            y = yk.new_empty((t, c, m, *yk.shape[1:]))
            if keep_gathered:
                gathered = x_shard.new_empty((t, c, m, *rest))
        y[:, k] = yk.view(t, m, *yk.shape[1:])
        if keep_gathered:
            gathered[:, k] = bufs[k].view(t, m, *rest)
    y = y.view(t * n, *y.shape[3:])
    if keep_gathered:
        gathered = gathered.view(t * n, *rest)
    return y, gathered


def matmul_reduce_scatter(x_full: torch.Tensor, mm: MatMul, group: Any, *, chunks: int = 1,
                          name: str = "gemm") -> torch.Tensor:
    """`reduce_scatter(mm(x_full))` along dim 0, the scatter of chunk k overlapped with `mm` of
    chunk k+1.

    Args:
        x_full: (t·n, ...) the full sequence (sequence first); `mm(x_full)` is a partial sum.
        mm: row-wise map (rows, ..., k) → (rows, ..., o).
        group: the TP group (size t).
        chunks: pipeline depth c (1 = one GEMM, then one reduce-scatter).
        name: label of the GEMM events in a `Tracer`.

    Returns:
        (n, ..., o): this rank's shard of the summed output.
    """
    t = group_size(group)
    n = x_full.shape[0] // t
    c = effective_chunks(n, chunks)
    if c == 1:
        with span("compute", name):
            y = mm(x_full).contiguous()
        out = y.new_empty((n, *y.shape[1:]))
        reduce_scatter_tensor(out, y, group)
        return out
    m = n // c
    xv = x_full.view(t, c, m, *x_full.shape[1:])
    out = None
    handles = []
    keep = []  # the chunk outputs must stay alive until their reduce-scatter finished
    for k in range(c):
        with span("compute", name):
            yk = mm(xv[:, k].reshape(t * m, *x_full.shape[1:])).contiguous()  # (t·m, ..., o)
        if out is None:
            out = yk.new_empty((n, *yk.shape[1:]))
        keep.append(yk)
        handles.append(reduce_scatter_tensor(out[k * m:(k + 1) * m], yk, group, async_op=True))
    for h in handles:
        h.wait()
    return out
