"""Every TP layer equals its single-device reference: forward, input/weight/bias gradients.

Hypothesis draws a *batch* of cases in the parent; each batch runs inside ONE
`run_distributed` call (start_method="fork": ~0.3 s instead of ~10 s per spawn), where each rank
checks every case in every mode (sequence parallel on/off, overlap on/off) against `nn.Linear` /
`nn.Embedding` / `F.cross_entropy` with the weights sliced by `.chunk`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from haillm.parallel import (
    ColumnParallelLinear,
    ParallelDims,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from tests.helpers import assert_close, run_distributed, tol

WORLD_SIZES = [1, 2, 4]
EXAMPLES = min(settings().max_examples, 4)  # each example is a batch of cases in one run
MODES = [  # (sequence_parallel, overlap_grad_comm, overlap_sp_comm)
    (False, False, False), (False, True, False), (True, False, False), (True, True, True),
]


def run(fn, world_size, *args):
    return run_distributed(fn, world_size, *args, start_method="fork")


@st.composite
def linear_case(draw, world_size):
    t = world_size
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        in_f=draw(st.integers(1, 9)),  # free: odd sizes included
        out_f=t * draw(st.integers(1, 5)),  # the split dimension
        seq=t * draw(st.integers(1, 6)),  # under SP the sequence must split over t
        batch=draw(st.integers(1, 3)),
        seq_dim=draw(st.sampled_from([0, 1])),
        bias=draw(st.booleans()),
        chunks=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
    )


def _x_shape(c, feat):
    return (c["seq"], c["batch"], feat) if c["seq_dim"] == 0 else (c["batch"], c["seq"], feat)


def _inputs(c, in_f, out_f):
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(*_x_shape(c, in_f), generator=g, dtype=c["dtype"])
    gy = torch.randn(*_x_shape(c, out_f), generator=g, dtype=c["dtype"])
    torch.manual_seed(c["seed"])
    full = nn.Linear(in_f, out_f, bias=c["bias"], dtype=c["dtype"])
    return x, gy, full


def _reference(full, x, gy):
    x = x.clone().requires_grad_(True)
    y = full(x)
    (y * gy).sum().backward()
    grads = (x.grad, full.weight.grad, None if full.bias is None else full.bias.grad)
    full.zero_grad(set_to_none=True)
    return y.detach(), grads


def _column_cases(cases):
    t, r = dist.get_world_size(), dist.get_rank()
    for c in cases:
        x, gy, full = _inputs(c, c["in_f"], c["out_f"])
        y_ref, (gx_ref, gw_ref, gb_ref) = _reference(full, x, gy)
        sd = c["seq_dim"]
        for sp, ov_grad, ov_sp in MODES:
            for gather in ([False, True] if not sp else [False]):
                layer = ColumnParallelLinear.from_full(
                    full, sequence_parallel=sp, gather_output=gather, seq_dim=sd,
                    overlap_grad_comm=ov_grad, overlap_sp_comm=ov_sp, sp_chunks=c["chunks"])
                xin = (x.chunk(t, dim=sd)[r] if sp else x).clone().requires_grad_(True)
                y = layer(xin)
                exp_y = y_ref if gather else y_ref.chunk(t, dim=-1)[r]
                msg = f"column case={c} sp={sp} overlap={ov_grad, ov_sp} gather={gather}"
                assert_close(y, exp_y, msg=msg)
                (y * (gy if gather else gy.chunk(t, dim=-1)[r])).sum().backward()
                assert_close(xin.grad, gx_ref.chunk(t, dim=sd)[r] if sp else gx_ref, msg=msg)
                assert_close(layer.weight.grad, gw_ref.chunk(t, dim=0)[r], msg=msg)
                if c["bias"]:
                    assert_close(layer.bias.grad, gb_ref.chunk(t, dim=0)[r], msg=msg)
    return True


def _row_cases(cases):
    t, r = dist.get_world_size(), dist.get_rank()
    for c in cases:
        x, gy, full = _inputs(c, c["out_f"], c["in_f"])  # row splits its *input* features
        y_ref, (gx_ref, gw_ref, gb_ref) = _reference(full, x, gy)
        sd = c["seq_dim"]
        for sp, _, ov_sp in MODES:
            for parallel_in in ([True, False] if not sp else [True]):
                layer = RowParallelLinear.from_full(
                    full, sequence_parallel=sp, input_is_parallel=parallel_in, seq_dim=sd,
                    overlap_sp_comm=ov_sp, sp_chunks=c["chunks"])
                xin = (x.chunk(t, dim=-1)[r] if parallel_in else x).clone().requires_grad_(True)
                y = layer(xin)
                msg = f"row case={c} sp={sp} overlap={ov_sp} input_is_parallel={parallel_in}"
                assert_close(y, y_ref.chunk(t, dim=sd)[r] if sp else y_ref, msg=msg)
                (y * (gy.chunk(t, dim=sd)[r] if sp else gy)).sum().backward()
                assert_close(xin.grad, gx_ref.chunk(t, dim=-1)[r] if parallel_in else gx_ref,
                             msg=msg)
                assert_close(layer.weight.grad, gw_ref.chunk(t, dim=1)[r], msg=msg)
                if c["bias"]:
                    assert_close(layer.bias.grad, gb_ref, msg=msg)
    return True


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_column_parallel_linear_equals_nn_linear(world_size, data):
    cases = data.draw(st.lists(linear_case(world_size), min_size=3, max_size=3))
    assert all(run(_column_cases, world_size, cases))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_row_parallel_linear_equals_nn_linear(world_size, data):
    cases = data.draw(st.lists(linear_case(world_size), min_size=3, max_size=3))
    assert all(run(_row_cases, world_size, cases))


# ------------------------------------------------------------------ merged (q, k, v) outputs
def _partitioned(parts, seed):
    t, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed)
    full = nn.Linear(6, sum(parts), dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    y_ref = full(x).detach()
    layer = ColumnParallelLinear.from_full(full, partition_sizes=parts)
    local = layer.split_output(layer(x))
    for i, ref_part in enumerate(y_ref.split(parts, dim=-1)):
        assert_close(local[i], ref_part.chunk(t, dim=-1)[r])
    gathered = ColumnParallelLinear.from_full(full, partition_sizes=parts, gather_output=True)(x)
    assert_close(gathered, y_ref)
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_partitioned_column_keeps_each_part_local(world_size):
    assert all(run(_partitioned, world_size, [4 * world_size, 2 * world_size, world_size], 3))


# ------------------------------------------------------------------ embedding
@st.composite
def embedding_case(draw, world_size):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        vocab=world_size * draw(st.integers(1, 9)),
        dim=draw(st.integers(1, 7)),
        seq=world_size * draw(st.integers(1, 4)),
        batch=draw(st.integers(1, 3)),
        seq_dim=draw(st.sampled_from([0, 1])),
        padding=draw(st.booleans()),
    )


def _embedding_cases(cases):
    t, r = dist.get_world_size(), dist.get_rank()
    for c in cases:
        torch.manual_seed(c["seed"])
        full = nn.Embedding(c["vocab"], c["dim"], padding_idx=0 if c["padding"] else None,
                            dtype=torch.float64)
        shape = (c["seq"], c["batch"]) if c["seq_dim"] == 0 else (c["batch"], c["seq"])
        ids = torch.randint(0, c["vocab"], shape)
        gy = torch.randn(*shape, c["dim"], dtype=torch.float64)
        y_ref = full(ids)
        (y_ref * gy).sum().backward()
        for sp in (False, True):
            layer = VocabParallelEmbedding.from_full(full, sequence_parallel=sp,
                                                     seq_dim=c["seq_dim"])
            y = layer(ids)
            sd = c["seq_dim"]
            msg = f"embedding case={c} sp={sp}"
            assert_close(y, y_ref.chunk(t, dim=sd)[r] if sp else y_ref, msg=msg)
            (y * (gy.chunk(t, dim=sd)[r] if sp else gy)).sum().backward()
            assert_close(layer.weight.grad, full.weight.grad.chunk(t, dim=0)[r], msg=msg)
    return True


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_vocab_parallel_embedding_equals_nn_embedding(world_size, data):
    cases = data.draw(st.lists(embedding_case(world_size), min_size=3, max_size=3))
    assert all(run(_embedding_cases, world_size, cases))


# ------------------------------------------------------------------ cross-entropy
def _ce_cases(cases):
    t, r = dist.get_world_size(), dist.get_rank()
    for c in cases:
        g = torch.Generator().manual_seed(c["seed"])
        logits = torch.randn(*c["lead"], c["vocab"], generator=g, dtype=c["dtype"]) * c["scale"]
        target = torch.randint(0, c["vocab"], c["lead"], generator=g)
        target[torch.rand(c["lead"], generator=g) < c["p_ignore"]] = -100
        for reduction in ("mean", "sum", "none"):
            ref_in = logits.clone().requires_grad_(True)
            ref = F.cross_entropy(ref_in.reshape(-1, c["vocab"]), target.reshape(-1),
                                  reduction=reduction)
            if reduction == "none":
                ref = ref.view(c["lead"])
            gl = torch.rand(ref.shape, generator=g, dtype=c["dtype"])
            (ref * gl).sum().backward()
            shard = logits.chunk(t, dim=-1)[r].clone().requires_grad_(True)
            loss = vocab_parallel_cross_entropy(shard, target, reduction=reduction)
            (loss * gl).sum().backward()
            msg = f"ce case={c} reduction={reduction}"
            # every token ignored + "mean": 0/0 = nan, as F.cross_entropy (then equal_nan)
            kw = dict(equal_nan=True, msg=msg, **tol(c["dtype"]))
            torch.testing.assert_close(loss, ref.float(), **kw)
            torch.testing.assert_close(shard.grad, ref_in.grad.chunk(t, dim=-1)[r], **kw)
    return True


@st.composite
def ce_case(draw, world_size):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        lead=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))),
        vocab=world_size * draw(st.integers(1, 11)),
        scale=draw(st.sampled_from([1.0, 30.0])),  # large logits: the max must be subtracted
        p_ignore=draw(st.sampled_from([0.0, 0.3])),
        dtype=torch.float32,
    )


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_vocab_parallel_cross_entropy_equals_f_cross_entropy(world_size, data):
    cases = data.draw(st.lists(ce_case(world_size), min_size=3, max_size=3))
    assert all(run(_ce_cases, world_size, cases))


# ------------------------------------------------------------------ errors
def _errors():
    t = dist.get_world_size()
    out = []
    for make in (
        lambda: ColumnParallelLinear(4, 3, group=None),
        lambda: ColumnParallelLinear(4, 6, partition_sizes=[4, 1, 1]),
        lambda: RowParallelLinear(5, 4),
        lambda: VocabParallelEmbedding(7, 4),
        lambda: RowParallelLinear(4, 4, sequence_parallel=True)(torch.randn(3, 2, 4 // t)),
        lambda: ColumnParallelLinear(4, 4)(torch.randn(3, 5)),
        lambda: ParallelDims(tp=4),
    ):
        try:
            make()
            out.append("no error")
        except ValueError as e:
            out.append(str(e))
    return out


def test_errors_name_the_argument():
    msgs = run(_errors, 2)[0]
    assert msgs[0] == "out_features (3) must be divisible by tp (2)"
    assert msgs[1] == "partition_sizes[1] (1) must be divisible by tp (2)"
    assert msgs[2] == "in_features (5) must be divisible by tp (2)"
    assert msgs[3] == "num_embeddings (7) must be divisible by tp (2)"
    assert msgs[4] == "sequence length (3) must be divisible by tp (2)"
    assert msgs[5] == "input last dim (5) must equal in_features (4)"
    assert msgs[6] == "dp * tp * pp (1 * 4 * 1 = 4) must equal the world size (2)"


def test_cross_entropy_shape_error():
    with pytest.raises(ValueError, match=r"target shape \(3,\) must equal"):
        vocab_parallel_cross_entropy(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))


def test_degree_one_without_torch_distributed():
    """No process group at all: every layer is its single-device self."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    full, emb = nn.Linear(5, 6, dtype=torch.float64), nn.Embedding(7, 3, dtype=torch.float64)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    for sp in (False, True):
        col = ColumnParallelLinear.from_full(full, sequence_parallel=sp, overlap_sp_comm=sp)
        assert_close(col(x), full(x))
        row = RowParallelLinear.from_full(full, sequence_parallel=sp, overlap_sp_comm=sp)
        assert_close(row(x), full(x))
    ids = torch.randint(0, 7, (4, 2))
    assert_close(VocabParallelEmbedding.from_full(emb)(ids), emb(ids))
    logits = torch.randn(4, 7)
    target = torch.randint(0, 7, (4,))
    assert_close(vocab_parallel_cross_entropy(logits, target), F.cross_entropy(logits, target))


def _autocast_cases(seed):
    """Under torch.autocast(bf16) the layers behave like nn.Linear under autocast: bf16
    output, fp32 parameter gradients, within the low-precision rule of the fp32 truth."""
    from tests.helpers import assert_lowp_close

    t, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(16, 8 * t), nn.Linear(8 * t, 16)
    x = torch.randn(4 * t, 2, 16)
    truth = fc2(F.gelu(fc1(x.to(torch.bfloat16).float())))  # fp32 from the rounded input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = fc2(F.gelu(fc1(x)))
    for sp in (False, True):
        col = ColumnParallelLinear.from_full(fc1, sequence_parallel=sp)
        row = RowParallelLinear.from_full(fc2, sequence_parallel=sp)
        xin = x.chunk(t)[r] if sp else x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = row(F.gelu(col(xin)))
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert col.weight.grad.dtype == torch.float32 and row.bias.grad.dtype == torch.float32
        # t partial sums are rounded to bf16 before the reduction (as in Megatron): allow 2t
        assert_lowp_close(y, ref.chunk(t)[r] if sp else ref, truth.chunk(t)[r] if sp else truth,
                          factor=2.0 * t, name=f"autocast sp={sp}")
    return True


@pytest.mark.parametrize("world_size", [1, 2])
def test_autocast_bf16_like_nn_linear(world_size):
    assert all(run(_autocast_cases, world_size, 5))
