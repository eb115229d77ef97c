"""Context parallelism: ParallelDims(cp=...), split/gather_sequence and ring attention on 2 and
4 gloo ranks, equal to flash_attention on the whole sequence (fp64: out, dq, dk, dv)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import example, given, settings
from hypothesis import strategies as st

from haillm.flashattn import flash_attention
from haillm.parallel import (
    ParallelDims,
    all_reduce,
    context_parallel_attention,
    gather_sequence,
    group_size,
    split_sequence,
)
from tests.helpers import assert_close, run_distributed


def run(fn, world_size, *args, **kw):
    return run_distributed(fn, world_size, *args, start_method="fork", **kw)


# ---------------------------------------------------------------------------- the grid
def test_grid_order_tp_cp_dp_pp():
    d = ParallelDims(dp=2, tp=2, pp=2, cp=2, world_size=16, rank=0)
    # global = pp*8 + dp*4 + cp*2 + tp
    assert d.all_groups("tp")[:2] == [[0, 1], [2, 3]]
    assert d.all_groups("cp")[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.all_groups("dp")[:4] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert d.all_groups("pp")[:2] == [[0, 8], [1, 9]]
    assert d.all_groups("dp_cp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert d.ranks_of_group("mp", 6) == [6, 7, 14, 15]  # tp × pp at dp1 cp1
    for r in range(16):
        c, x = d.coords_of(r), d.cp_rank_of(r)
        assert d.rank_of(dp=c.dp, tp=c.tp, pp=c.pp, cp=x) == r
    e = ParallelDims(dp=2, tp=2, pp=2, cp=2, world_size=16, rank=13)  # pp1 dp1 cp0 tp1
    assert (e.coords, e.cp_rank, e.dp_cp_rank, e.dp_cp_size) == ((1, 1, 1), 0, 2, 4)
    assert e.pp_prev_rank == 5 and e.pp_next_rank is None
    with pytest.raises(ValueError, match=r"dp \* cp \* tp \* pp \(1 \* 3 \* 1 \* 1 = 3\) must "
                                         r"equal the world size \(4\)"):
        ParallelDims(cp=3, world_size=4)
    with pytest.raises(ValueError, match=r"cp \(0\) must be an integer >= 1"):
        ParallelDims(cp=0)


@pytest.mark.parametrize("layout", [(2, 2, 1), (1, 2, 2), (4, 1, 1), (2, 1, 2)])
def test_cp_one_leaves_the_grid_unchanged(layout):
    dp, tp, pp = layout
    a = ParallelDims(dp=dp, tp=tp, pp=pp, world_size=4)
    b = ParallelDims(dp=dp, tp=tp, pp=pp, cp=1, world_size=4)
    for kind in ("tp", "dp", "pp", "mp", "dp_tp"):
        assert a.all_groups(kind) == b.all_groups(kind)
    assert a.all_groups("dp_cp") == a.all_groups("dp")
    assert a.all_groups("cp") == [[r] for r in range(4)]
    assert str(a).startswith(f"ParallelDims(dp={dp}, tp={tp}, pp={pp}; ")


# ---------------------------------------------------------------------------- degree 1
def test_degree_one_is_flash_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        want = flash_attention(q, k, v, causal=causal, softmax_scale=0.3)
        got = context_parallel_attention(q, k, v, causal=causal, softmax_scale=0.3)
        assert torch.equal(got, want)
    assert split_sequence(q) is q and gather_sequence(q) is q


# ---------------------------------------------------------------------------- on gloo ranks
def _ring_cases(cases, dtype=torch.float64):
    """Per case: [(got, want) for out, dq, dk, dv], this rank's shard of each."""
    cp = group_size()
    res = []
    for (b, chunks, hk, g, d, causal, scale, lb, impl, seed) in cases:
        S = (2 * cp if lb else cp) * chunks
        gen = torch.Generator().manual_seed(seed)
        mk = lambda h: torch.randn(b, S, h, d, generator=gen, dtype=torch.float64).to(dtype)
        q, k, v, do = mk(hk * g), mk(hk), mk(hk), mk(hk * g)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = flash_attention(*full, causal=causal, softmax_scale=scale, impl="reference")
        want = (ref, *torch.autograd.grad(ref, full, do))
        shards = [split_sequence(t, load_balance=lb).requires_grad_() for t in (q, k, v)]
        out = context_parallel_attention(*shards, causal=causal, softmax_scale=scale,
                                         load_balance=lb, impl=impl)
        got = (out, *torch.autograd.grad(out, shards, split_sequence(do, load_balance=lb)))
        res.append([(a.detach(), split_sequence(w.detach(), load_balance=lb))
                    for a, w in zip(got, want)])
    return res


case = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 2), st.integers(1, 3),
                 st.sampled_from([1, 4, 8]), st.booleans(),
                 st.one_of(st.none(), st.floats(0.1, 1.5)), st.booleans(),
                 st.sampled_from(["tiled", "reference"]), st.integers(0, 2**16))


PINNED = [(2, 2, 2, 2, 8, True, None, True, "tiled", 1),  # causal zigzag, GQA
          (1, 3, 1, 2, 4, True, 0.7, False, "tiled", 2),  # causal contiguous (skipped blocks)
          (1, 1, 2, 1, 1, True, None, True, "reference", 3),  # one row per chunk
          (2, 2, 1, 3, 4, False, 1.3, True, "tiled", 4)]


@pytest.mark.parametrize("world_size", [2, 4])
@settings(max_examples=4)
@given(cases=st.lists(case, min_size=4, max_size=4))
@example(cases=PINNED)
def test_ring_attention_equals_flash_attention_fp64(world_size, cases):
    """Hypothesis over batch, shard length, heads, kv heads (GQA), head dim, causal, scale,
    both layouts and the block impl; 4 cases per launch of the ranks."""
    for rank_res in run(_ring_cases, world_size, cases):
        for c, pairs in zip(cases, rank_res):
            for name, (got, want) in zip(("out", "dq", "dk", "dv"), pairs):
                assert_close(got, want, msg=f"{name} {c}")


def test_ring_attention_triton_blocks_fp32():
    """The Triton block path (interpreter, fp32), causal zigzag with GQA, on 2 ranks; against
    the fp32 reference on the whole sequence (both fp32)."""
    cases = [(1, 8, 1, 2, 16, True, None, True, "triton", 3)]
    for rank_res in run(_ring_cases, 2, cases, torch.float32):
        for name, (got, want) in zip(("out", "dq", "dk", "dv"), rank_res[0]):
            assert_close(got, want, msg=name)


def _layouts_groups_and_errors():
    r = dist.get_rank()
    x = torch.arange(2 * 16, dtype=torch.float64).view(2, 16, 1)
    out = {}
    for lb in (True, False):
        s = split_sequence(x, load_balance=lb)
        out[lb] = (s[0, :, 0].tolist(), torch.equal(gather_sequence(s, load_balance=lb), x))
    errors = []
    for call in (lambda: split_sequence(torch.zeros(1, 6, 1)),
                 lambda: split_sequence(torch.zeros(1, 6, 1), load_balance=False, dim=-2),
                 lambda: context_parallel_attention(*(torch.zeros(1, 3, 1, 4),) * 3)):
        try:
            call()
            errors.append("")
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    d = ParallelDims(dp=2, cp=2).build()
    sums = {}
    for kind in ("cp", "dp", "dp_cp"):
        t = torch.tensor([float(r)])
        all_reduce(t, getattr(d, f"{kind}_group"))
        sums[kind] = (t.item(), float(sum(d.ranks_of_group(kind))))
    out["groups"] = sums
    out["cp"] = (d.cp_rank, d.dp_rank, d.cp_size)
    return out


def test_layouts_groups_and_errors_on_four_ranks():
    res = run(_layouts_groups_and_errors, 4)
    for r, out in enumerate(res):
        assert out["errors"][0].startswith("split_sequence: x.shape[1] (the sequence length) "
                                           "(6) must be divisible by 2*cp = 8")
        assert "x.shape[-2] (the sequence length) (6) must be divisible by cp = 4" in out["errors"][1]
        assert "q.shape[1] (this rank's shard, 3) must be even" in out["errors"][2]
        for kind, (got, want) in out["groups"].items():
            assert got == want, kind
        assert out["cp"] == (r % 2, r // 2, 2)
    assert [out[False][0] for out in res] == [list(range(4 * r, 4 * r + 4)) for r in range(4)]
    assert [out[True][0] for out in res] == [[2 * r, 2 * r + 1, 14 - 2 * r, 15 - 2 * r]
                                             for r in range(4)]
    assert all(out[False][1] and out[True][1] for out in res)


def _zigzag_on_two():
    x = torch.arange(8.0).view(1, 8)
    s = split_sequence(x, load_balance=True).requires_grad_()
    (gather_sequence(s) * torch.arange(8.0)).sum().backward()
    return s[0].tolist(), s.grad[0].tolist(), torch.equal(gather_sequence(s), x)


def test_zigzag_layout_on_two_ranks():
    # 2*cp = 4 chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    res = run(_zigzag_on_two, 2)
    assert res[0][0] == [0, 1, 6, 7] and res[1][0] == [2, 3, 4, 5]
    assert res[0][1] == [0, 1, 6, 7] and res[1][1] == [2, 3, 4, 5]  # d/dx of x·arange
    assert res[0][2] and res[1][2]
