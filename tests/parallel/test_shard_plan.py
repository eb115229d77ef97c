"""`Shard` (a sharding rule as data) and `parallelize_module` (the plan applied).

`Shard.local`/`full` are exact inverses for every kind, tp and merged parts; `slices` names
exactly the elements `local` takes; `parallelize_module` on real weights equals the layers'
`from_full`, and on 2 gloo ranks a planned MLP-like model computes the single-device output
and gradients.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from haillm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    find_rule,
    parallelize_module,
)
from tests.helpers import assert_close, run_distributed


@st.composite
def rule_and_tensor(draw):
    tp = draw(st.sampled_from([1, 2, 3, 4]))
    kind = draw(st.sampled_from(["column", "row", "vocab", "replicated"]))
    parts = ()
    if kind == "column" and draw(st.booleans()):
        parts = tuple(tp * draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    rows = sum(parts) if parts else tp * draw(st.integers(1, 4))
    cols = tp * draw(st.integers(1, 4))
    shape = (rows,) if kind == "replicated" and draw(st.booleans()) else (rows, cols)
    seed = draw(st.integers(0, 2**31 - 1))
    full = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Shard(kind, parts), full, tp


@given(rule_and_tensor())
def test_local_and_full_are_inverses(case):
    rule, full, tp = case
    locals_ = [rule.local(full, r, tp) for r in range(tp)]
    assert all(t.shape == rule.local_shape(full.shape, tp) for t in locals_)
    assert torch.equal(rule.full(locals_), full)
    for r, t in enumerate(locals_):
        # `slices` names exactly the elements `local` holds, in order
        pieces = [full[s] for s in rule.slices(full.shape, r, tp)]
        assert torch.equal(torch.cat(pieces, dim=rule.dim or 0), t)
        if rule.dim is not None and tp > 1:  # a real slice is a copy, never a view of full
            assert t.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
    if rule.kind == "replicated" or tp == 1:
        assert all(t is full for t in locals_)


def test_merged_parts_are_cut_separately():
    rule = Shard("column", (4, 2, 2))  # q, k, v (GQA widths)
    full = torch.arange(8.0)[:, None]
    assert rule.local(full, 0, 2)[:, 0].tolist() == [0, 1, 4, 6]  # q0 q1 | k0 | v0
    assert rule.local(full, 1, 2)[:, 0].tolist() == [2, 3, 5, 7]


def test_bad_rules_are_refused_with_the_argument():
    with pytest.raises(ValueError, match="kind"):
        Shard("diagonal")
    with pytest.raises(ValueError, match="parts are for column"):
        Shard("row", (2, 2))
    with pytest.raises(ValueError, match=r"parts \[3, 3\] must sum to dim 0 of the tensor \(8\)"):
        Shard("column", (3, 3)).local(torch.zeros(8, 2), 0, 2)
    with pytest.raises(ValueError, match="divisible"):
        Shard("row").local(torch.zeros(2, 5), 0, 2)


class _Toy(nn.Module):
    def __init__(self, v=16, d=8, f=12):
        super().__init__()
        self.embed = nn.Embedding(v, d)
        self.norm = nn.LayerNorm(d, bias=False)
        self.up = nn.Linear(d, 2 * f, bias=False)  # merged [gate; up]
        self.down = nn.Linear(f, d, bias=True)

    def forward(self, ids):  # ids (B, S) -> (B, S, d)
        h = self.norm(self.embed(ids))
        gate, up = self.up(h).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


PLAN = {"embed.weight": Shard("vocab"), "norm.weight": Shard("replicated"),
        "up.weight": Shard("column", (12, 12)), "down.*": Shard("row")}


def test_plan_lookup_and_strictness():
    assert find_rule(PLAN, "down.bias").kind == "row" and find_rule(PLAN, "x.weight") is None
    with pytest.raises(ValueError, match=r"no rule for parameters \['extra.weight'\]"):
        m = _Toy()
        m.extra = nn.Linear(2, 2, bias=False)
        parallelize_module(m, PLAN)
    assert parallelize_module(_Toy(), PLAN).up.__class__ is nn.Linear  # degree 1: a no-op


def _planned_equals_full(seed):
    import torch.distributed as dist

    torch.manual_seed(seed)
    full = _Toy().double()
    ids = torch.randint(0, 16, (2, 6))
    want = full(ids)
    want.square().sum().backward()
    for sp in (False, True):
        model = _Toy().double()
        model.load_state_dict(full.state_dict())
        parallelize_module(model, PLAN, group=None, sequence_parallel=sp, seq_dim=1)
        assert isinstance(model.embed, VocabParallelEmbedding)
        assert isinstance(model.up, ColumnParallelLinear) and model.up.partition_sizes == [12, 12]
        assert isinstance(model.down, RowParallelLinear)
        # the swapped weights are the plan's slices of the full ones, as from_full slices them
        r = dist.get_rank()
        assert torch.equal(model.up.weight, Shard("column", (12, 12)).local(full.up.weight, r, 2))
        ref_up = ColumnParallelLinear.from_full(full.up, partition_sizes=[12, 12])
        assert torch.equal(model.up.weight, ref_up.weight)
        out = model(ids)
        if sp:  # the output is this rank's sequence shard (B, S/2, d)
            assert model.norm.weight.sequence_parallel  # marked: its gradient is partial
            got = [torch.empty_like(out) for _ in range(2)]
            dist.all_gather(got, out.detach().contiguous())
            assert_close(torch.cat(got, 1), want.detach(), dtype=torch.float64)
        else:
            assert_close(out, want.detach(), dtype=torch.float64)
            out.square().sum().backward()
            g = [torch.empty_like(model.up.weight.grad) for _ in range(2)]
            dist.all_gather(g, model.up.weight.grad)
            assert_close(Shard("column", (12, 12)).full(g), full.up.weight.grad,
                         dtype=torch.float64)
            assert_close(model.norm.weight.grad, full.norm.weight.grad, dtype=torch.float64)
    return True


def test_parallelize_module_on_two_ranks_equals_the_full_model():
    assert all(run_distributed(_planned_equals_full, 2, 0, start_method="fork"))
