"""`PipelineExecutor.run_forward` on real gloo ranks, and recording without a collective.

One spawn per world size runs every forward-only case: the outputs must be *bitwise* those
of the unsplit model run micro-batch by micro-batch (same ops on the same values: P2P copies
bits), the losses those of `run`, no graph may be built and no sent activation kept alive.
"""

from __future__ import annotations

import gc
import time
import weakref
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from torch import nn

from haillm.pipeline import PipelineExecutor, TensorSpec
from tests.helpers import run_distributed
from tests.pipeline.test_executor import HIDDEN, _loss, _make_layers, _run_layers


def _leaves(x):
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for v in (x.values() if isinstance(x, dict) else x) for t in _leaves(v)]


class Spy(nn.Module):
    """Runs ``inner`` and notes, before each call, how many earlier activations are alive
    (and whether autograd is on).

    ``log`` is shared by all chunks of a rank: weak references to the activations a forward
    received and produced (not the user's micro-batches, not the last stage's outputs, which
    `run_forward` returns). Freed by reference counting only (the test disables gc), so a
    reference cycle would count as a leak too.
    """

    def __init__(self, inner: nn.Module, log: list, *, first: bool, last: bool) -> None:
        super().__init__()
        self.inner, self.log, self.first, self.last = inner, log, first, last
        self.alive_before: list[int] = []
        self.grad_mode: list[bool] = []

    def forward(self, x):
        self.alive_before.append(sum(r() is not None for r in self.log))
        self.grad_mode.append(torch.is_grad_enabled())  # a graph would be built (then freed)
        out = self.inner(x)
        if not self.first:
            self.log += [weakref.ref(t) for t in _leaves(x)]
        if not self.last:  # (on the first stage, a leaf passed through is the user's own)
            mine = {id(t) for t in _leaves(x)} if self.first else set()
            self.log += [weakref.ref(t) for t in _leaves(out) if id(t) not in mine]
        return out


def _batches(kind, m, mb, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m * mb, HIDDEN, generator=g, dtype=dtype)
    y = torch.randn(m * mb, HIDDEN, generator=g, dtype=dtype)
    if kind == "tensor":
        return list(x.chunk(m)), list(y.chunk(m)), (mb, HIDDEN)
    ids = torch.randint(0, 5, (m * mb,), generator=g)
    skip = torch.randn(m * mb, HIDDEN, generator=g, dtype=dtype)
    mbs = [{"h": a, "skip": b, "ids": c} for a, b, c in zip(x.chunk(m), skip.chunk(m), ids.chunk(m))]
    spec = {"h": (mb, HIDDEN), "skip": (mb, HIDDEN), "ids": TensorSpec((mb,), torch.int64)}
    return mbs, list(y.chunk(m)), spec


def _forward_cases(cases, p=None, s=None):
    """Per rank: a list of failures (strings); empty when every check held."""
    if p is None:
        p, s = dist.get_world_size(), dist.get_rank()
    problems = []
    for schedule, v, m, kind, dtype in cases:
        what = f"{schedule} p={p} v={v} m={m} {kind} {dtype} stage {s}"
        nlayers, seed = p * v, 100 * m + 10 * v + p
        ref, mine = _make_layers(nlayers, kind, seed).to(dtype), _make_layers(nlayers, kind, seed)
        mine = mine.to(dtype)
        inputs, targets, spec = _batches(kind, m, 2, dtype, seed)
        log: list = []
        chunks = [Spy(mine[c * p + s], log, first=c * p + s == 0, last=c * p + s == nlayers - 1)
                  for c in range(v)]
        calls: list = []
        ex = PipelineExecutor(chunks, loss_fn=_loss, tensor_shapes=spec, dtype=dtype,
                              schedule=schedule, record=True, on_last_backward=calls.append,
                              backward_context=lambda c, last: calls.append(c) or nullcontext())
        first, last = s == 0, s == p - 1
        gc.disable()
        try:
            outs = ex.run_forward(inputs if first else None, num_microbatches=m)
            losses = ex.run_forward(inputs if first else None, targets if last else None,
                                    num_microbatches=m)
        finally:
            gc.enable()
        leaked = [(c, n) for c, sp in enumerate(chunks) for n in sp.alive_before if n]
        if leaked:
            problems.append(f"{what}: activations alive at a later forward (chunk, count) {leaked}")
        if any(g for sp in chunks for g in sp.grad_mode):
            problems.append(f"{what}: a forward ran with autograd enabled")
        if any(prm.grad is not None for prm in mine.parameters()) or calls:
            problems.append(f"{what}: gradients or backward hooks touched: {calls}")
        if len(ex.records) != m * v or ex.peak_inflight != 1 or ex.released_outputs:
            problems.append(f"{what}: records/peak {len(ex.records)} {ex.peak_inflight}")
        if not last:
            if outs != [] or losses != []:
                problems.append(f"{what}: a non-last stage returned something")
        else:
            want = [_run_layers(ref, x) for x in inputs]  # micro-batch by micro-batch
            for i, (got, exp) in enumerate(zip(outs, want, strict=True)):
                for a, b in zip(_leaves(got), _leaves(exp), strict=True):
                    if a.requires_grad or a.grad_fn is not None:
                        problems.append(f"{what}: output {i} carries a graph")
                    if not torch.equal(a, b):
                        problems.append(f"{what}: output {i} differs from the unsplit model")
            want_loss = [_loss(o, t).detach() for o, t in zip(want, targets)]
            if len(losses) != m or not all(torch.equal(a, b) for a, b in zip(losses, want_loss)):
                problems.append(f"{what}: losses {losses} != unsplit {want_loss}")
        tl = ex.gather_timeline() if dist.is_initialized() else None
        # run: the same per-micro-batch losses (its forward under autograd computes the same)
        trained = ex.run(inputs if first else None, targets if last else None, num_microbatches=m)
        if last and not all(torch.equal(a, b) for a, b in zip(trained, losses, strict=True)):
            problems.append(f"{what}: run_forward losses {losses} != run losses {trained}")
        if tl is not None:
            if len(tl.ops) != p * m * v or tl.peak_inflight != [1] * p:
                problems.append(f"{what}: timeline {len(tl.ops)} ops, {tl.peak_inflight}")
            # each rank is off by at most its bound (stage 0 by none): two ranks by twice it
            slack = 2 * tl.meta["clock_error_s"] + 1e-6
            for o in tl.ops:  # aligned clocks: a forward starts after the one feeding it ends
                q = o.action.chunk * p + o.stage
                if q > 0:
                    prev = tl.find((q - 1) % p, "F", o.action.microbatch, (q - 1) // p)
                    if prev.end > o.start + slack:
                        problems.append(f"{what}: {o} starts before {prev} ends")
    return problems


def _cases(p):
    f32, f64 = torch.float32, torch.float64
    return [("1f1b", 1, 1, "tensor", f32), ("1f1b", 1, 3, "tensor", f32),
            ("gpipe", 1, 2, "dict", f64), ("interleaved", 2, p, "tensor", f32),
            ("interleaved", 2, p + 1, "dict", f64)]


def _world(p):
    problems = _forward_cases(_cases(p))
    if p == 2:  # pp = 1 inside a 2-rank world: a group of one, several chunks, dist initialized
        from haillm.parallel import ParallelDims

        dims = ParallelDims(dp=2, tp=1, pp=1).build()
        x = [torch.randn(2, HIDDEN) for _ in range(3)]
        layers = _make_layers(3, "tensor", 5).float()
        ex = PipelineExecutor.from_parallel_dims(dims, list(layers), loss_fn=_loss,
                                                 tensor_shapes=(2, HIDDEN), schedule="interleaved")
        got = ex.run_forward(x)
        if not all(torch.equal(a, _run_layers(layers, b)) for a, b in zip(got, x, strict=True)):
            problems.append("pp=1 group of one, 3 chunks: outputs differ")
    return problems


@pytest.mark.parametrize("world_size", [2, 4])
def test_run_forward_matches_unsplit_model(world_size):
    for problems in run_distributed(_world, world_size, world_size, timeout=120,
                                    start_method="fork"):
        assert problems == []


def test_run_forward_single_stage_without_process_group():
    """p = 1 without torch.distributed: one chunk, and 3 chunks talking through the mailbox."""
    f32, f64 = torch.float32, torch.float64
    cases = [("1f1b", 1, 3, "tensor", f32), ("interleaved", 3, 2, "tensor", f32),
             ("interleaved", 2, 3, "dict", f64)]
    assert _forward_cases(cases, p=1, s=0) == []


def test_run_forward_errors():
    layer = _make_layers(1, "tensor", 0)[0]
    ex = PipelineExecutor(layer, loss_fn=_loss, tensor_shapes=(2, HIDDEN), dtype=torch.float64)
    with pytest.raises(ValueError, match="inputs are required on the first pipeline stage"):
        ex.run_forward(num_microbatches=2)
    with pytest.raises(ValueError, match="got 1 micro-batches but num_microbatches=2"):
        ex.run_forward([torch.zeros(2, HIDDEN, dtype=torch.float64)], num_microbatches=2)
    # a forward-only list given to `run` would leave every activation waiting for a backward
    from haillm.pipeline import schedule_forward_only

    ex = PipelineExecutor(layer, loss_fn=_loss, tensor_shapes=(2, HIDDEN),
                          schedule=schedule_forward_only(1, 1, 0))
    with pytest.raises(ValueError, match="has no backward; for a forward-only pass call run_forward"):
        ex.run([torch.zeros(2, HIDDEN, dtype=torch.float64)] * 1,
               [torch.zeros(2, HIDDEN, dtype=torch.float64)])


# --------------------------------------------------------------------------- timing

_COLLECTIVES = ("barrier", "monitored_barrier", "all_reduce", "all_gather", "all_gather_object",
                "all_gather_into_tensor", "broadcast", "broadcast_object_list", "gather",
                "gather_object", "scatter", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                "all_to_all", "all_to_all_single")


def _timing_case():
    p, s, m = dist.get_world_size(), dist.get_rank(), 4
    layers = _make_layers(p, "tensor", 3).float()
    x = [torch.randn(2, HIDDEN) for _ in range(m)]
    ex = PipelineExecutor(layers[s], loss_fn=_loss, tensor_shapes=(2, HIDDEN), record=True)
    calls: list[str] = []
    saved = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapper

    for name, fn in saved.items():
        setattr(dist, name, counting(name, fn))
    try:
        busy = []
        for _ in range(3):  # training steps, then an evaluation, as a trainer runs them
            ex.run(x if s == 0 else None, x if s == p - 1 else None, num_microbatches=m)
            busy.append(sum(r.end - r.start for r in ex.records))
            assert len(ex.records) == 2 * m
        ex.run_forward(x if s == 0 else None, num_microbatches=m)
        busy.append(sum(r.end - r.start for r in ex.records))
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    # Alignment: rank 1 starts its run 0.2 s late; stage 0's F0 needs nothing from it, so on
    # an aligned axis stage 1's F0 starts >= 0.2 s after stage 0's F0 ended. With each rank's
    # own zero (no alignment) the two F0 would both sit near t = 0.
    dist.barrier()
    if s == 1:
        time.sleep(0.2)
    ex.run_forward(x if s == 0 else None, num_microbatches=m)
    offset, error = ex._clock_offset(8)
    tl = ex.gather_timeline()
    gap = tl.find(1, "F", 0).start - tl.find(0, "F", 0).end
    return calls, busy, gap, offset, error, tl.meta["clock_error_s"]


def test_record_issues_no_collective_and_gather_timeline_aligns_clocks():
    for calls, busy, gap, offset, error, meta_error in run_distributed(
            _timing_case, 2, timeout=120, start_method="fork"):
        assert calls == [], "record=True must not cost a collective per run"
        assert all(b > 0 for b in busy), busy  # the compute time is there, every run
        assert 0.1 < gap < 2.0, gap  # (margins for a loaded machine; unaligned: gap ~ 0)
        # forked ranks on one host share CLOCK_MONOTONIC: the true offset is 0, and the
        # estimate must be within its own error bound of it
        assert abs(offset) <= error + 1e-6 and error < 0.05, (offset, error)
        assert 0 <= meta_error < 0.05
