"""MergedLinear column-parallel under TP (2 gloo ranks): the per-rank merged GEMM, gathered
per part, equals the separate single-device projections; weight-shard gradients equal slices
of the full gradients; the fused SwiGLU and residual GEMMs compose with the TP split."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from haillm.fusedops import MergedLinear, linear_residual, linear_swiglu
from tests.helpers import assert_close, run_distributed

# (in_features, part widths, bias, leading dims): Q/K/V with GQA (unequal), gate+up (equal)
CASES = [
    (16, (32, 8, 8), False, (2, 3)),
    (7, (12, 4, 4), True, (5,)),
    (10, (6, 6), False, (1,)),
    (9, (18, 2, 2), True, (3, 1)),
]


def _gather_last(t: torch.Tensor) -> torch.Tensor:
    """all_gather along the last dim (what ColumnParallelLinear(gather_output=True) does)."""
    chunks = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(chunks, t.contiguous())
    return torch.cat(chunks, dim=-1)


def _rank_main(cases, interpret: bool):
    """Returns [(name, got, want, dtype)]: compared in the parent, because
    torch.testing.assert_close imports DTensor (sympy, ~10 s) once a process group exists."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    check = lambda got, want, msg, dtype=None: out.append((f"rank {rank} {msg}", got, want, dtype))
    for i, (k, widths, bias, lead) in enumerate(cases):
        torch.manual_seed(1234 + i)  # identical on every rank: every rank holds the full layers
        lins = [nn.Linear(k, o, bias=bias, dtype=torch.float64) for o in widths]
        x = torch.randn(*lead, k, dtype=torch.float64)
        grads = [torch.randn(*lead, o, dtype=torch.float64) for o in widths]  # dL/d(part)

        shard = MergedLinear.from_separate(lins, tp_rank=rank, tp_size=world)
        assert shard.out_features == tuple(o // world for o in widths)
        parts = shard.forward_split(x)  # local split of the local GEMM's output
        for j, (part, lin) in enumerate(zip(parts, lins)):
            check(_gather_last(part), lin(x), f"case {i} part {j}")

        # backward: each rank's weight-shard gradient = its rows of each part's full gradient
        loss = sum((p * g.chunk(world, dim=-1)[rank]).sum() for p, g in zip(parts, grads))
        loss.backward()
        sum((lin(x) * g).sum() for lin, g in zip(lins, grads)).backward()
        want_w = torch.cat([lin.weight.grad.chunk(world, dim=0)[rank] for lin in lins])
        check(shard.weight.grad, want_w, f"case {i} dW")
        if bias:
            want_b = torch.cat([lin.bias.grad.chunk(world, dim=0)[rank] for lin in lins])
            check(shard.bias.grad, want_b, f"case {i} db")
        # shard() of the unsharded merged layer gives the same slice
        assert torch.equal(MergedLinear.from_separate(lins).shard(rank, world).weight,
                           shard.weight)

    # The MLP under TP: gate_up column-parallel (fused SwiGLU per rank, no communication),
    # down row-parallel with the residual added on rank 0 only, then one all-reduce.
    torch.manual_seed(99)
    hidden, inter = 12, 20
    gate, up = (nn.Linear(hidden, inter, bias=False) for _ in range(2))
    down = nn.Linear(inter, hidden, bias=False)
    x, res = torch.randn(4, hidden), torch.randn(4, hidden)
    gu = MergedLinear.from_separate([gate, up], tp_rank=rank, tp_size=world)
    impls = ["reference"] + (["triton"] if interpret else [])
    for impl in impls:
        h = linear_swiglu(x, gu.weight, impl=impl)  # (4, inter / world)
        check(_gather_last(h), F.silu(gate(x)) * up(x), f"{impl} swiglu", torch.float32)
        w_down = down.weight.chunk(world, dim=1)[rank]  # (hidden, inter / world)
        y = linear_residual(h, w_down, res if rank == 0 else torch.zeros_like(res), impl=impl)
        dist.all_reduce(y)
        check(y, down(F.silu(gate(x)) * up(x)) + res, f"{impl} mlp", torch.float32)
    return out


def test_merged_linear_column_parallel_two_ranks():
    # fork: the ranks inherit the imported torch/triton (spawn re-imports them: ~10 s on CI)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    results = run_distributed(_rank_main, 2, CASES, interpret, timeout=180, start_method="fork")
    n = len(results[0])
    assert n == len(results[1]) >= 3 * len(CASES) + 2
    for checks in results:
        for name, got, want, dtype in checks:
            assert_close(got.detach(), want.detach(), dtype=dtype, msg=name)
