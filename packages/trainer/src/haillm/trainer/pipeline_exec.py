"""Run one optimizer step's micro-batches on this pipeline stage, following a schedule.

The schedule is data (a list of `Action("F"|"B", microbatch, chunk)`, from `haillm.pipeline`
when installed, else the small generators below). The executor walks it:

* ``F(i)``: take micro-batch i's input (tokens on the first stage, else receive the residual
  stream from the previous stage), run the stage, send the output on (or, on the last stage,
  keep the loss divided by the number of micro-batches: gradient accumulation);
* ``B(i)``: on the last stage backward from the loss; elsewhere receive dL/d(output) from
  the next stage and backward from the output; send dL/d(input) to the previous stage; then
  drop micro-batch i's activations.

Sends are non-blocking (`isend`), receives blocking, and every stage pair talks in one
direction per message kind, so the schedules' own ordering rules out deadlocks. Before the
step's **last** backward the `on_last_backward` hook runs: that is where ZeRO starts its
bucketed reduce-scatter, overlapping the tail of the backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from haillm.trainer.grid import Grid

__all__ = ["Action", "StepTimes", "make_schedule", "run_step"]


@dataclass(frozen=True)
class Action:
    """One unit of pipeline work (same fields as `haillm.pipeline.Action`)."""

    kind: str
    microbatch: int
    chunk: int = 0


def _own_1f1b(p: int, m: int, s: int) -> list[Action]:
    warm = min(p - s - 1, m)
    acts = [Action("F", i) for i in range(warm)]
    f, b = warm, 0
    while f < m:
        acts += [Action("F", f), Action("B", b)]
        f, b = f + 1, b + 1
    acts += [Action("B", i) for i in range(b, m)]
    return acts


def _own_gpipe(p: int, m: int, s: int) -> list[Action]:
    return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]


def make_schedule(kind: str, pp: int, m: int, stage: int) -> tuple[list, str]:
    """The action list for this stage and where it came from."""
    name = {"1f1b": "schedule_1f1b", "gpipe": "schedule_gpipe"}.get(kind)
    if name is None:
        raise ValueError(f"pipeline schedule {kind!r}: this executor runs '1f1b' and 'gpipe' "
                         "(one model chunk per stage)")
    try:
        import haillm.pipeline as hp

        return list(getattr(hp, name)(pp, m, stage)), f"haillm.pipeline.{name}"
    except (ImportError, AttributeError):
        own = _own_1f1b if kind == "1f1b" else _own_gpipe
        return own(pp, m, stage), f"fallback: trainer {name}"


@dataclass
class StepTimes:
    compute: float = 0.0
    p2p: float = 0.0


def run_step(stage, actions, inputs: list, targets: list, grid: Grid, *, act_shape,
             act_dtype, loss_scale: float = 1.0,
             on_last_backward: Callable[[], None] | None = None,
             times: StepTimes | None = None) -> torch.Tensor:
    """Run `actions` for one optimizer step; returns the summed loss on the last stage (else 0).

    Args:
        stage: the `StageModel` of this rank.
        inputs, targets: per micro-batch (B_micro, S) int64 tensors.
        act_shape: shape of the residual stream between stages (B_micro, S_local, d).
        loss_scale: multiplies the loss before backward (fp16 loss scaling).
    """
    times = times or StepTimes()
    m = len(inputs)
    first, last = grid.is_first_stage, grid.is_last_stage
    prev, nxt = grid.stage_peer(-1), grid.stage_peer(+1)
    saved: dict[int, tuple] = {}
    sends: list = []
    total = torch.zeros((), dtype=torch.float32, device=inputs[0].device)
    n_back = sum(1 for a in actions if a.kind == "B")
    done_back = 0

    def recv(src):
        t0 = time.perf_counter()
        buf = torch.empty(act_shape, dtype=act_dtype, device=inputs[0].device)
        dist.recv(buf, src=src)
        times.p2p += time.perf_counter() - t0
        return buf

    def send(t, dst):
        t0 = time.perf_counter()
        t = t.detach().contiguous()
        sends.append((dist.isend(t, dst=dst), t))
        times.p2p += time.perf_counter() - t0

    for a in actions:
        i = a.microbatch
        if a.kind == "F":
            x = inputs[i] if first else recv(prev).requires_grad_()
            t0 = time.perf_counter()
            out = stage(x, targets[i] if last else None)
            if last:
                out = out / m
                total += out.detach().float()
            times.compute += time.perf_counter() - t0
            if not last:
                send(out, nxt)
            saved[i] = (x, out)
        else:
            done_back += 1
            if done_back == n_back and on_last_backward is not None:
                on_last_backward()
            x, out = saved.pop(i)
            grad = None if last else recv(nxt)
            t0 = time.perf_counter()
            if last:
                (out * loss_scale).backward()
            else:
                torch.autograd.backward(out, grad)
            times.compute += time.perf_counter() - t0
            if not first:
                send(x.grad, prev)
            del x, out  # this micro-batch's activations die here
    t0 = time.perf_counter()
    for work, _ in sends:
        work.wait()
    times.p2p += time.perf_counter() - t0
    return total


def package_executor_available() -> bool:
    try:
        from haillm.pipeline import PipelineExecutor  # noqa: F401
    except ImportError:
        return False
    return True


class PackageStep:
    """One optimizer step's micro-batches through `haillm.pipeline.PipelineExecutor`.

    The executor owns the schedule (1F1B, GPipe or interleaved with several model chunks per
    stage), the P2P exchange and the 1/m loss scaling; the trainer gives it the stage's
    chunk(s), the loss (vocab-parallel under TP) and the hook that starts the ZeRO
    reduce-scatter before the last micro-batch's backward. With several chunks per stage the
    hook fires once per chunk, while other chunks still have backwards to run, so the
    reduction then starts after the run instead (no overlap).
    """

    def __init__(self, chunks: list, grid: Grid, *, schedule: str, act_shape, dtype, device,
                 on_last_backward: Callable[[], None] | None):
        from haillm.pipeline import PipelineExecutor

        self.chunks, self.grid = chunks, grid
        self.scale = 1.0
        last = chunks[-1]
        self.hook = on_last_backward if len(chunks) == 1 else None

        def loss_fn(logits, targets):
            return last.loss(logits, targets) * self.scale

        self.ex = PipelineExecutor(
            chunks[0] if len(chunks) == 1 else chunks, group=grid.pp_group, loss_fn=loss_fn,
            tensor_shapes=tuple(act_shape), dtype=dtype, device=device, schedule=schedule,
            on_last_backward=(lambda c: self.hook()) if self.hook else None,
            record=grid.pp > 1)  # per-action times: the rest of the run is P2P and waiting
        self.after_run = on_last_backward if len(chunks) > 1 else None

    def __call__(self, inputs, targets, *, loss_scale=1.0, times: StepTimes | None = None):
        self.scale = loss_scale
        t0 = time.perf_counter()
        first = self.grid.is_first_stage
        last = self.grid.is_last_stage
        losses = self.ex.run(inputs if first else None, targets if last else None,
                             num_microbatches=len(inputs))
        if self.after_run is not None:
            self.after_run()
        if times is not None:
            elapsed = time.perf_counter() - t0
            busy = sum(r.end - r.start for r in getattr(self.ex, "records", []) or [])
            if busy:  # recorded: forward/backward time is compute, the rest P2P and bubble
                times.compute += busy
                times.p2p += max(elapsed - busy, 0.0)
            else:
                times.compute += elapsed
        total = torch.zeros((), dtype=torch.float32, device=inputs[0].device)
        for loss in losses:
            total += loss.float() / (len(inputs) * loss_scale)
        return total
