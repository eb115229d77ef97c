"""The executor on real gloo ranks: a split MLP stack equals the unsplit model.

One spawn per world size; every case (schedule x chunks x micro-batches x activation kind)
runs inside it, comparing loss and every parameter gradient with the unsplit model in float64.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from haillm.pipeline import PipelineExecutor, TensorSpec, schedule_interleaved_1f1b
from tests.helpers import assert_close, run_distributed

HIDDEN = 7  # odd on purpose


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.lin(x)) + 0.5 * x


class TupleBlock(nn.Module):
    """Structured activation: a dict with a float tensor, a pass-through float and int ids."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.emb = nn.Embedding(5, d)

    def forward(self, act):
        h, skip, ids = act["h"], act["skip"], act["ids"]
        h = torch.tanh(self.lin(h) + self.emb(ids)) + skip
        return {"h": h, "skip": skip, "ids": ids}


def _make_layers(n: int, kind: str, seed: int) -> nn.ModuleList:
    torch.manual_seed(seed)
    cls = Block if kind == "tensor" else TupleBlock
    return nn.ModuleList(cls(HIDDEN) for _ in range(n)).double()


def _run_layers(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def _loss(out, target):
    h = out if isinstance(out, torch.Tensor) else out["h"]
    return ((h - target) ** 2).mean()


def _pipeline_cases(cases):
    """Per rank: [(what, pipeline value, unsplit value), ...], compared in the parent.

    (Comparing in the parent keeps `torch.testing`, which imports sympy, out of the ranks.)
    """
    p, s = dist.get_world_size(), dist.get_rank()
    pairs = []
    for schedule, v, m, mb, kind, per_chunk in cases:
        nlayers = p * v * per_chunk
        seed = 1000 * m + 10 * v + nlayers
        ref = _make_layers(nlayers, kind, seed)
        mine = _make_layers(nlayers, kind, seed)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(m * mb, HIDDEN, generator=g, dtype=torch.float64)
        y = torch.randn(m * mb, HIDDEN, generator=g, dtype=torch.float64)
        if kind == "tensor":
            full_in = x
            mbs = list(x.chunk(m))
            spec = (mb, HIDDEN)
        else:
            ids = torch.randint(0, 5, (m * mb,), generator=g)
            skip = torch.randn(m * mb, HIDDEN, generator=g, dtype=torch.float64)
            full_in = {"h": x, "skip": skip, "ids": ids}
            mbs = [{"h": a, "skip": b, "ids": c}
                   for a, b, c in zip(x.chunk(m), skip.chunk(m), ids.chunk(m))]
            spec = {"h": (mb, HIDDEN), "skip": (mb, HIDDEN), "ids": TensorSpec((mb,), torch.int64)}
        ref_loss = _loss(_run_layers(ref, full_in), y)
        ref_loss.backward()

        chunks = []
        for c in range(v):
            q = c * p + s
            chunks.append(nn.Sequential(*mine[q * per_chunk:(q + 1) * per_chunk]))
        calls = []
        # "explicit": this stage's own list; the executor cannot see the other stages' lists
        # then, so it must use deferred sends instead of the lockstep protocol.
        sched = schedule_interleaved_1f1b(p, m, s, v) if schedule == "explicit" else schedule
        ex = PipelineExecutor(
            chunks, loss_fn=_loss, tensor_shapes=spec, dtype=torch.float64, schedule=sched,
            on_last_backward=calls.append, record=True,
        )
        losses = ex.run(mbs if s == 0 else None, list(y.chunk(m)) if s == p - 1 else None,
                        num_microbatches=m)
        what = f"{schedule} p={p} v={v} m={m} {kind} stage {s}"
        if s == p - 1:
            assert len(losses) == m
            pairs.append((f"{what}: loss", torch.stack(losses).mean(), ref_loss.detach()))
        else:
            assert losses == []
        for c in range(v):
            q = c * p + s
            for i in range(q * per_chunk, (q + 1) * per_chunk):
                for (name, pa), pb in zip(mine[i].named_parameters(), ref[i].parameters()):
                    if pb.grad is None:  # e.g. an embedding row never used: both None/zero
                        assert pa.grad is None or not pa.grad.any(), what
                        continue
                    pairs.append((f"{what}: layer {i} {name}", pa.grad, pb.grad))
        assert sorted(calls) == list(range(v)), (what, calls)
        if schedule == "explicit":
            assert not ex._lockstep, what
        else:
            assert ex._lockstep, f"{what}: built-in schedules run Megatron's lockstep protocol"
        assert 1 <= ex.peak_inflight <= m * v
        tl = ex.gather_timeline()
        assert len(tl.ops) == 2 * m * v * p
        if schedule == "1f1b":
            assert ex.peak_inflight == min(p - s, m), what
        if schedule == "gpipe":
            assert ex.peak_inflight == m, what
        if kind == "tensor" and s < p - 1:  # every sent output's storage was released
            assert ex.released_outputs == m * v, (what, ex.released_outputs)
    return pairs


def _cases(p: int):
    cases = []
    for m in (1, 3, 2 * p) if p == 2 else (1, 4):
        cases += [("gpipe", 1, m, 2, "tensor", 1), ("1f1b", 1, m, 3, "tensor", 2)]
    cases += [("interleaved", 2, p, 2, "tensor", 1), ("interleaved", 2, 2 * p, 1, "tensor", 1)]
    cases += [("interleaved", 2, p + 1, 1, "tensor", 1)]  # m not a multiple of p
    cases += [("1f1b", 1, 3, 2, "dict", 1), ("interleaved", 2, p, 2, "dict", 1)]
    cases += [("explicit", 2, 2 * p, 1, "tensor", 1), ("explicit", 1, 3, 2, "tensor", 1)]
    if p == 2:
        cases += [("interleaved", 3, 4, 1, "tensor", 1), ("gpipe", 1, 2, 1, "dict", 1)]
    return cases


@pytest.mark.parametrize("world_size", [2, 4])
def test_pipeline_matches_unsplit_model(world_size):
    out = run_distributed(_pipeline_cases, world_size, _cases(world_size), timeout=120,
                          start_method="fork")
    ncases = len(_cases(world_size))
    assert sum(what.endswith(": loss") for what, _, _ in out[-1]) == ncases
    for pairs in out:
        assert pairs, "every rank holds parameters and must report gradients"
        for what, actual, expected in pairs:
            assert_close(actual, expected, msg=what)


def test_single_stage_without_process_group():
    """p = 1 (no torch.distributed at all): a plain gradient-accumulation loop."""
    torch.manual_seed(0)
    layers = _make_layers(3, "tensor", 0)
    ref = _make_layers(3, "tensor", 0)
    x, y = torch.randn(6, HIDDEN, dtype=torch.float64), torch.randn(6, HIDDEN, dtype=torch.float64)
    _loss(_run_layers(ref, x), y).backward()
    seen = []

    @contextlib.contextmanager
    def ctx(chunk, is_last):
        seen.append(("enter", chunk, is_last))
        yield
        seen.append(("exit", chunk, is_last))

    ex = PipelineExecutor(nn.Sequential(*layers), loss_fn=_loss, tensor_shapes=(2, HIDDEN),
                          dtype=torch.float64, backward_context=ctx,
                          on_last_backward=lambda c: seen.append(("last", c)))
    losses = ex.run(list(x.chunk(3)), list(y.chunk(3)))
    assert len(losses) == 3
    assert seen == [("enter", 0, False), ("exit", 0, False)] * 2 + [
        ("last", 0), ("enter", 0, True), ("exit", 0, True)]
    for a, b in zip(layers.parameters(), ref.parameters()):
        assert_close(a.grad, b.grad)


def test_errors_name_the_problem():
    layer = _make_layers(1, "tensor", 0)[0]
    x = [torch.randn(2, HIDDEN, dtype=torch.float64)]
    with pytest.raises(ValueError, match="loss_fn is required on the last pipeline stage"):
        PipelineExecutor(layer, tensor_shapes=(2, HIDDEN))
    ex = PipelineExecutor(layer, loss_fn=_loss, tensor_shapes=(2, HIDDEN), schedule="zigzag")
    with pytest.raises(ValueError, match="schedule must be 'gpipe', '1f1b' or 'interleaved'"):
        ex.run(x, x)
    ex = PipelineExecutor(layer, loss_fn=_loss, tensor_shapes=(2, HIDDEN))
    with pytest.raises(ValueError, match="targets are required on the last pipeline stage"):
        ex.run(x)
    with pytest.raises(ValueError, match="got 1 micro-batches but num_microbatches=2"):
        ex.run(x, x, num_microbatches=2)
    with pytest.raises(ValueError, match="needs a list of >= 2 chunks"):
        PipelineExecutor(layer, loss_fn=_loss, tensor_shapes=(2, HIDDEN), schedule="interleaved")
    with pytest.raises(TypeError, match="tensor_shapes: cannot read"):
        PipelineExecutor(layer, loss_fn=_loss, tensor_shapes="big")


def test_declared_shape_is_checked():
    """A stage whose output disagrees with tensor_shapes fails before anything is sent."""
    from haillm.pipeline.p2p import flatten_like, normalize_spec

    spec = normalize_spec({"h": (2, 3), "ids": TensorSpec((2,), torch.int64)}, torch.float32)
    with pytest.raises(ValueError, match=r"activation\['h'\]: got shape \(2, 4\)"):
        flatten_like({"h": torch.zeros(2, 4), "ids": torch.zeros(2, dtype=torch.int64)}, spec)
    with pytest.raises(ValueError, match="expected a dict with keys"):
        flatten_like(torch.zeros(2, 3), spec)


def test_unflatten_holds_no_reference_cycle():
    """Received activations must die with their last reference, not at the next gc run."""
    import gc
    import weakref

    from haillm.pipeline.p2p import normalize_spec, unflatten

    spec = normalize_spec({"h": (2, 3), "pair": [(2,), (1,)]}, torch.float32)
    leaves = [torch.randn(2, 3), torch.randn(2), torch.randn(1)]
    refs = [weakref.ref(t) for t in leaves]
    gc.disable()
    try:
        out = unflatten(spec, leaves)
        assert out["pair"][1] is leaves[2]
        del out, leaves
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def _dims_case():
    """dp=2 x pp=2 on 4 ranks: two independent pipelines, built from ParallelDims."""
    from haillm.parallel import ParallelDims

    dims = ParallelDims(dp=2, tp=1, pp=2).build()
    s, m, mb = dims.pp_rank, 4, 2
    ref, mine = _make_layers(4, "tensor", 7), _make_layers(4, "tensor", 7)
    g = torch.Generator().manual_seed(100 + dims.dp_rank)  # each replica its own data
    x = torch.randn(m * mb, HIDDEN, generator=g, dtype=torch.float64)
    y = torch.randn(m * mb, HIDDEN, generator=g, dtype=torch.float64)
    _loss(_run_layers(ref, x), y).backward()
    ex = PipelineExecutor.from_parallel_dims(
        dims, nn.Sequential(*mine[2 * s:2 * s + 2]), loss_fn=_loss,
        tensor_shapes=(mb, HIDDEN), dtype=torch.float64)
    assert (ex.stage, ex.num_stages) == (s, 2)
    ex.run(list(x.chunk(m)) if dims.is_first_stage else None,
           list(y.chunk(m)) if dims.is_last_stage else None, num_microbatches=m)
    return [(f"dp {dims.dp_rank} layer {i}", a.grad, b.grad)
            for i in range(2 * s, 2 * s + 2)
            for a, b in zip(mine[i].parameters(), ref[i].parameters())]


def test_from_parallel_dims():
    out = run_distributed(_dims_case, 4, timeout=120, start_method="fork")
    for pairs in out:
        assert len(pairs) == 4
        for what, actual, expected in pairs:
            assert_close(actual, expected, msg=what)


class ColumnMajorBlock(nn.Module):
    """Returns a non-contiguous view (column-major strides), as a transposed collective does."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = torch.tanh(self.lin(x)) + 0.5 * x  # (mb, d)
        return h.t().contiguous().t()  # same values, strides (1, mb): not contiguous


def _non_contiguous_case():
    p, s, m, mb = dist.get_world_size(), dist.get_rank(), 3, 2
    torch.manual_seed(7)
    ref = nn.ModuleList(ColumnMajorBlock(HIDDEN) for _ in range(p)).double()
    mine = nn.ModuleList(ColumnMajorBlock(HIDDEN) for _ in range(p)).double()
    mine.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(8)
    x = torch.randn(m * mb, HIDDEN, generator=g, dtype=torch.float64)
    y = torch.randn(m * mb, HIDDEN, generator=g, dtype=torch.float64)
    assert not mine[s](x[:mb]).is_contiguous()  # the case under test
    _loss(_run_layers(ref, x), y).backward()
    out = []
    for schedule in ("1f1b", "gpipe"):
        mine.zero_grad()
        ex = PipelineExecutor(mine[s], loss_fn=_loss, tensor_shapes=(mb, HIDDEN),
                              dtype=torch.float64, schedule=schedule)
        ex.run(list(x.chunk(m)) if s == 0 else None, list(y.chunk(m)) if s == p - 1 else None,
               num_microbatches=m)
        out += [(f"{schedule} stage {s} {n}", a.grad.clone(), b.grad)
                for (n, a), b in zip(mine[s].named_parameters(), ref[s].parameters())]
    return out


def test_non_contiguous_stage_output_is_sent():
    """Regression: a stage returning a non-contiguous view used to fail in P2P with
    "input tensor has to be contiguous"; the executor now sends a dense copy."""
    out = run_distributed(_non_contiguous_case, 2, timeout=120, start_method="fork")
    for pairs in out:
        assert len(pairs) == 4
        for what, actual, expected in pairs:
            assert_close(actual, expected, msg=what)
