"""ParallelDims (grid order, validation, groups) and the collective compatibility helper."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from haillm.parallel import (
    ParallelDims,
    all_gather_into_tensor,
    all_reduce,
    group_size,
    reduce_scatter_tensor,
)
from tests.helpers import run_distributed, sum_rounding


def run(fn, world_size, *args, **kw):
    # fork: ~0.3 s per call instead of ~10 s for spawn (no fresh torch import per rank)
    return run_distributed(fn, world_size, *args, start_method="fork", **kw)


def test_grid_order_is_megatron_tp_fastest():
    d = ParallelDims(dp=2, tp=2, pp=2, world_size=8, rank=5)
    assert d.coords == (0, 1, 1)  # dp, tp, pp
    assert d.all_groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.all_groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.all_groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert d.all_groups("mp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert d.all_groups("dp_tp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert d.pp_prev_rank == 1 and d.pp_next_rank is None
    assert d.is_last_stage and not d.is_first_stage
    for r in range(8):
        c = d.coords_of(r)
        assert d.rank_of(dp=c.dp, tp=c.tp, pp=c.pp) == r


def test_world_size_one_needs_no_distributed():
    d = ParallelDims().build()
    assert d.tp_group is None and d.dp_group is None and d.pp_group is None
    assert d.is_first_stage and d.is_last_stage and d.pp_prev_rank is None
    x = torch.randn(3, 2)
    out = torch.empty(3, 2)
    all_gather_into_tensor(out, x)
    torch.testing.assert_close(out, x)
    reduce_scatter_tensor(out, x * 2)
    torch.testing.assert_close(out, x * 2)
    assert all_reduce(x, async_op=True).wait()


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(dp=2, tp=3, pp=1, world_size=4), r"dp \* tp \* pp \(2 \* 3 \* 1 = 6\) must equal the world size \(4\)"),
        (dict(tp=0), r"tp \(0\) must be an integer >= 1"),
        (dict(dp=1.5), r"dp \(1.5\) must be an integer >= 1"),
        (dict(pp=2, world_size=2, rank=2), r"rank \(2\) must be in"),
    ],
)
def test_validation_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ParallelDims(**kw)


def test_build_without_process_group_fails_clearly():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelDims(tp=2).build()


def _ranks_and_groups(dp, tp, pp):
    d = ParallelDims(dp=dp, tp=tp, pp=pp).build()
    out = {}
    for kind in ("tp", "dp", "pp", "mp", "dp_tp"):
        g = getattr(d, f"{kind}_group")
        t = torch.tensor([float(dist.get_rank())])
        all_reduce(t, g)
        out[kind] = (group_size(g), t.item(), sum(d.ranks_of_group(kind)))
    out["coords"] = tuple(d.coords)
    out["prev_next"] = (d.pp_prev_rank, d.pp_next_rank)
    # A p2p hop along the pipeline, as a pipeline engine would do it.
    if pp > 1:
        x = torch.tensor([float(d.rank)])
        if d.pp_next_rank is not None:
            dist.send(x, d.pp_next_rank)
        if d.pp_prev_rank is not None:
            y = torch.empty(1)
            dist.recv(y, d.pp_prev_rank)
            out["recv"] = y.item()
    return out


LAYOUTS_4 = [(1, 2, 2), (2, 2, 1), (4, 1, 1), (1, 1, 4)]
SHAPES = [(1, 1), (3, 5), (7, 2)]


def _all_on_four_ranks():
    groups = [_ranks_and_groups(*layout) for layout in LAYOUTS_4]
    return groups, _collectives("auto", SHAPES), _collectives("fallback", SHAPES)


def test_groups_and_collectives_on_four_gloo_ranks():
    res = run(_all_on_four_ranks, 4)
    for li, (dp, tp, pp) in enumerate(LAYOUTS_4):
        ref = ParallelDims(dp=dp, tp=tp, pp=pp, world_size=4)
        for rank, (groups, _, _) in enumerate(res):
            out = groups[li]
            for kind in ("tp", "dp", "pp", "mp", "dp_tp"):
                size, summed, expected = out[kind]
                assert summed == expected, (kind, rank)
                assert size == len(ref.ranks_of_group(kind, rank))
            assert out["coords"] == tuple(ref.coords_of(rank))
            if pp > 1 and out["prev_next"][0] is not None:
                assert out["recv"] == out["prev_next"][0]
    assert all(native and fallback for _, native, fallback in res)


def _collectives(impl, shapes):
    t, r = dist.get_world_size(), dist.get_rank()
    results = []
    for n, h in shapes:
        g = torch.Generator().manual_seed(1000 * n + h)
        full = [torch.randn(t * n, h, generator=g, dtype=torch.float64) for _ in range(t)]
        out = torch.empty(n, h, dtype=torch.float64)
        reduce_scatter_tensor(out, full[r], impl=impl)
        expect = sum(full)[r * n:(r + 1) * n]
        # the same t values added in another order: twice sum_rounding(t) eps64 of Sigma|terms|
        slack = 2 * sum_rounding(t) * torch.finfo(torch.float64).eps \
            * sum(f.abs() for f in full)[r * n:(r + 1) * n]
        results.append(bool(((out - expect).abs() <= slack).all()))
        w = reduce_scatter_tensor(out, full[r], impl=impl, async_op=True)
        w.wait()
        results.append(bool(((out - expect).abs() <= slack).all()))
        gathered = torch.empty(t * n, h, dtype=torch.float64)
        w = all_gather_into_tensor(gathered, full[r][:n], impl=impl, async_op=True)
        w.wait()
        results.append(torch.equal(gathered, torch.cat([f[:n] for f in full])))
    return all(results)


def _both_impls(shapes):
    return _collectives("auto", shapes) and _collectives("fallback", shapes)


def test_collectives_native_and_fallback_two_ranks():
    assert all(run(_both_impls, 2, SHAPES))


def test_shape_errors():
    with pytest.raises(ValueError, match=r"output shape \(3, 2\) must be"):
        all_gather_into_tensor(torch.empty(3, 2), torch.empty(2, 2))
    with pytest.raises(ValueError, match="impl must be"):
        reduce_scatter_tensor(torch.empty(2), torch.empty(2), impl="nope")


def _unsupported_native_falls_back_with_warning():
    import warnings

    import haillm.parallel.comm as comm

    def refuse(*a, **k):
        raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

    comm._NATIVE_REDUCE_SCATTER = refuse  # this forked rank only
    t, r = dist.get_world_size(), dist.get_rank()
    x = torch.arange(4.0 * t) + r
    out = torch.empty(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comm.reduce_scatter_tensor(out, x)
    expect = sum(torch.arange(4.0 * t) + q for q in range(t))[4 * r:4 * (r + 1)]
    return torch.equal(out, expect), [str(w.message) for w in caught]


def test_unsupported_reduce_scatter_falls_back_with_a_warning():
    for ok, messages in run(_unsupported_native_falls_back_with_warning, 2):
        assert ok
        assert any("all_to_all_single" in m for m in messages), messages
