"""The overlap really overlaps (event order), and layers work on TP *sub*groups of a grid."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from haillm.parallel import (
    ColumnParallelLinear,
    ParallelDims,
    RowParallelLinear,
    Tracer,
    gather_matmul,
    matmul_reduce_scatter,
)
from haillm.parallel.overlap import effective_chunks
from tests.helpers import assert_close, run_distributed


def run(fn, world_size, *args):
    return run_distributed(fn, world_size, *args, start_method="fork")


def _events(overlap, sp):
    t, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    col = ColumnParallelLinear.from_full(nn.Linear(8, 16), sequence_parallel=sp,
                                         overlap_grad_comm=overlap, overlap_sp_comm=overlap,
                                         sp_chunks=2)
    x = torch.randn(8, 2, 8)
    x = (x.chunk(t)[r] if sp else x).requires_grad_(True)
    with Tracer() as tr:
        col(x).sum().backward()
    torch.distributed.barrier()
    return [(e.kind, e.name, e.start, e.end, e.is_async) for e in tr.events]


def _check_order(events, overlap, comm_name):
    dw = next(e for e in events if e[1] == "gemm dW")
    if overlap:
        # the input-gradient reduction was *issued* before the dW GEMM started, asynchronously
        assert any(e[1] == comm_name and e[4] and e[2] <= dw[2] for e in events), events
    else:
        # without overlap every collective is synchronous: done before the next GEMM starts
        assert not any(e[4] for e in events), events
        assert all(e[3] <= dw[2] for e in events if e[0] == "comm" and e[2] < dw[2]), events


def test_backward_issues_reduction_before_weight_gemm():
    for sp, name in ((False, "all_reduce"), (True, "reduce_scatter")):
        for overlap in (False, True):
            ev = run(_events, 2, overlap, sp)[0]
            _check_order(ev, overlap, name)
            if sp and overlap:  # pipelined forward: 2 chunks → 2 forward GEMMs, async gathers
                assert sum(e[1] == "gemm fwd" for e in ev) == 2
                assert sum(e[1] == "all_gather" and e[4] for e in ev) >= 2


def _grid_layers(seed):
    dims = ParallelDims(dp=2, tp=2).build()
    t, r = dims.tp, dims.tp_rank
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(6, 8, dtype=torch.float64), nn.Linear(8, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + dims.dp_rank)  # each DP replica: its own data
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    y_ref = fc2(F.gelu(fc1(xr)))
    y_ref.square().sum().backward()
    kw = dict(group=dims.tp_group, sequence_parallel=True, overlap_sp_comm=True, sp_chunks=2)
    col = ColumnParallelLinear.from_full(fc1, **kw)
    row = RowParallelLinear.from_full(fc2, **kw)
    xin = x.chunk(t)[r].clone().requires_grad_(True)
    y = row(F.gelu(col(xin)))
    assert_close(y, y_ref.chunk(t)[r])
    y.square().sum().backward()
    assert_close(xin.grad, xr.grad.chunk(t)[r])
    assert_close(col.weight.grad, fc1.weight.grad.chunk(t, 0)[r])
    assert_close(row.weight.grad, fc2.weight.grad.chunk(t, 1)[r])
    return dims.coords


def test_layers_on_tp_subgroups_of_a_dp_tp_grid():
    coords = run(_grid_layers, 4, 3)
    assert [tuple(c) for c in coords] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def _pipelined_equals_plain(cases):
    """Both depths against the plain maths (the other ranks' shards are known: every rank
    draws the same base and adds its rank), and the depth really pipelines: one GEMM per
    chunk (a `chunks` argument that were ignored would give 1)."""
    t, r = dist.get_world_size(), dist.get_rank()
    for n_local, chunks in cases:
        g = torch.Generator().manual_seed(n_local * 31 + chunks)
        w = torch.randn(5, 3, generator=g, dtype=torch.float64)
        base = torch.randn(n_local, 2, 3, generator=g, dtype=torch.float64)
        xs = base + r
        every = torch.cat([base + q for q in range(t)])  # (t·n, 2, 3): the gathered input
        full = torch.randn(t * n_local, 2, 3, generator=g, dtype=torch.float64)  # same on all
        want_rs = (t * (full @ w.T))[r * n_local:(r + 1) * n_local]
        for c in (1, chunks):
            gemms = []

            def mm(a, gemms=gemms):
                gemms.append(a.shape[0])
                return a @ w.T

            y, gathered = gather_matmul(xs, mm, None, chunks=c, keep_gathered=True)
            assert torch.equal(gathered, every), (n_local, c)
            assert_close(y, every @ w.T)
            assert gemms == [t * n_local // effective_chunks(n_local, c)] * effective_chunks(
                n_local, c), (n_local, c, gemms)
            gemms.clear()
            assert_close(matmul_reduce_scatter(full, mm, None, chunks=c), want_rs)
            assert len(gemms) == effective_chunks(n_local, c), (n_local, c, gemms)
    return True


def test_pipelined_chunks_equal_one_shot():
    assert effective_chunks(6, 4) == 3 and effective_chunks(7, 4) == 1 and effective_chunks(2, 8) == 2
    assert all(run(_pipelined_equals_plain, 4, [(1, 4), (4, 4), (6, 4), (5, 3)]))


def _sp_grad_helpers():
    """Norm weights under SP: per-rank grads cover s/t tokens; helper and hooks sum them,
    and the hooks stay right with gradient accumulation (two backward passes)."""
    from haillm.parallel import (
        allreduce_sequence_parallel_grads,
        mark_sequence_parallel,
        register_sequence_parallel_grad_hooks,
    )

    t, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    ln = nn.LayerNorm(4, dtype=torch.float64)
    xs = [torch.randn(2 * t, 4, dtype=torch.float64) for _ in range(2)]
    for x in xs:  # reference: two accumulated backward passes on the full sequence
        ln(x).square().sum().backward()
    ref = ln.weight.grad.clone()
    a, b = nn.LayerNorm(4, dtype=torch.float64), nn.LayerNorm(4, dtype=torch.float64)
    mark_sequence_parallel(a.weight, a.bias, b.weight, b.bias)
    handles = register_sequence_parallel_grad_hooks(b)
    for x in xs:
        a(x.chunk(t)[r]).square().sum().backward()
        b(x.chunk(t)[r]).square().sum().backward()
    assert allreduce_sequence_parallel_grads(a) == 2
    assert_close(a.weight.grad, ref)
    assert_close(b.weight.grad, ref)
    assert len(handles) == (2 if t > 1 else 0)
    return True


def test_sequence_parallel_norm_grads_with_accumulation():
    assert all(run(_sp_grad_helpers, 2))
