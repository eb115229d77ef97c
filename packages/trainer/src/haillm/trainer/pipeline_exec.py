"""One optimizer step's micro-batches, and the evaluation, through `haillm.pipeline`'s executor.

The schedule (1F1B, GPipe, or interleaved 1F1B with several model chunks per stage), the P2P
exchange of the residual stream (B, S_local, d) and of its gradient, and gradient accumulation
(each micro-batch's loss divided by their number) are `haillm.pipeline.PipelineExecutor`'s;
evaluation runs its forward-only schedule over the same P2P. The trainer hands it the chunks,
the loss (the last chunk's: vocab-parallel under TP), the optimizer's `scale_loss` (fp16: times
the dynamic loss scale, which never leaves the optimizer) and the hook that starts ZeRO's
gradient reduction before the step's last backward. With one stage the
same executor simply runs the micro-batches in turn.

Timing costs no collective: the executor records each action's start and end on this rank's
clock; forward/backward time is compute, the rest of the step is P2P and pipeline bubble.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from haillm.pipeline import PipelineExecutor

__all__ = ["PipelineStep", "StepTimes"]


@dataclass
class StepTimes:
    """Seconds of one step: forward/backward compute, and P2P plus pipeline bubble."""

    compute: float = 0.0
    p2p: float = 0.0


class PipelineStep:
    """One optimizer step's micro-batches (`__call__`) or a forward-only pass (`evaluate`).

    Args:
        chunks: `parallelize`'s chunks of this rank (virtual stage c*pp + s is chunk c).
        schedule: ``1f1b``, ``gpipe`` or ``interleaved``.
        act_shape: the stream crossing a stage boundary for one micro-batch, (mb, S_local, d).
        scale_loss: ``loss -> loss to backpropagate`` (`Zero1AdamW.scale_loss`: fp16 loss
            scaling; identity otherwise); the step reports the unscaled losses.
        on_last_backward: called before the step's last backward (starts ZeRO's reduction).
            With several chunks per stage the executor's hook would fire once per chunk,
            while other chunks still have backwards to run, so the reduction then starts after
            the run instead (no overlap).
    """

    def __init__(self, chunks: list, *, schedule: str, act_shape, dtype, device,
                 scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 on_last_backward: Callable[[], None] | None = None):
        self.chunks, self.dims = chunks, chunks.dims
        last = chunks[-1]
        hook = on_last_backward if len(chunks) == 1 else None
        self.after_run = on_last_backward if len(chunks) > 1 else None
        self.scale_loss = (lambda loss: loss) if scale_loss is None else scale_loss
        self.losses: list[torch.Tensor] = []  # this run's unscaled per-micro-batch losses

        def loss_fn(logits, targets):
            loss = last.loss(logits, targets)
            self.losses.append(loss.detach())
            return self.scale_loss(loss) if torch.is_grad_enabled() else loss

        self.ex = PipelineExecutor(
            chunks[0] if len(chunks) == 1 else list(chunks), group=self.dims.pp_group,
            loss_fn=loss_fn, tensor_shapes=tuple(act_shape), dtype=dtype, device=device,
            schedule=schedule, on_last_backward=(lambda c: hook()) if hook else None,
            record=self.dims.pp > 1)

    def __call__(self, inputs, targets, *, times: StepTimes | None = None) -> torch.Tensor:
        """Forward and backward of the micro-batches `inputs`/`targets` (lists of (mb, S));
        returns this rank's mean loss (a 0-dim fp32 tensor, 0 off the last stage)."""
        t0 = time.perf_counter()
        dims = self.dims
        self.losses = []
        self.ex.run(inputs if dims.is_first_stage else None,
                    targets if dims.is_last_stage else None, num_microbatches=len(inputs))
        if self.after_run is not None:
            self.after_run()
        if times is not None:
            elapsed = time.perf_counter() - t0
            busy = sum(r.end - r.start for r in self.ex.records or [])
            if busy:  # recorded: forward/backward time is compute, the rest P2P and bubble
                times.compute += busy
                times.p2p += max(elapsed - busy, 0.0)
            else:
                times.compute += elapsed
        total = torch.zeros((), dtype=torch.float32, device=inputs[0].device)
        for loss in self.losses:
            total += loss.float() / len(inputs)
        return total

    @torch.no_grad()
    def evaluate(self, inputs, targets) -> list[float]:
        """Forward only (the executor's forward-only schedule): the per-micro-batch losses on
        the last stage, [] elsewhere."""
        dims = self.dims
        losses = self.ex.run_forward(inputs if dims.is_first_stage else None,
                                     targets if dims.is_last_stage else None,
                                     num_microbatches=len(inputs))
        return [float(v) for v in losses]
