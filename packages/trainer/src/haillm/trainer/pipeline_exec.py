"""Run one optimizer step's micro-batches on this pipeline stage: `haillm.pipeline`'s executor.

The schedule (1F1B, GPipe, or interleaved 1F1B with several model chunks per stage), the P2P
exchange of the residual stream (B, S_local, d) and of its gradient, and gradient accumulation
(each micro-batch's loss divided by their number) are `haillm.pipeline.PipelineExecutor`'s.
The trainer hands it the stage's chunk(s), the loss (vocab-parallel under TP, times the fp16
loss scale) and the hook that starts ZeRO's reduce-scatter before the step's last backward.
With one stage the same executor simply runs the micro-batches in turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from haillm.pipeline import PipelineExecutor
from haillm.trainer.grid import Grid

__all__ = ["PipelineStep", "StepTimes"]


@dataclass
class StepTimes:
    """Seconds of one step: forward/backward compute, and P2P plus pipeline bubble."""

    compute: float = 0.0
    p2p: float = 0.0


class PipelineStep:
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


PackageStep = PipelineStep  # the name before the trainer's own executor was removed
