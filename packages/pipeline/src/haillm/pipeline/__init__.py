"""haillm.pipeline: pipeline parallelism with GPipe, 1F1B and interleaved 1F1B schedules.

* `schedules`: the schedules as data (lists of `Action` per stage), and the forward-only one
  for evaluation (`schedule_forward_only`).
* `simulate`: an event simulation of those lists -> `Timeline` (bubble, in-flight activations).
* `draw`: SVG and text pictures of a `Timeline` (simulated or measured).
* `executor`: `PipelineExecutor`, which runs one stage's list for real over torch.distributed
  (`run`: a training step; `run_forward`: evaluation, forward only).
"""

from .draw import draw_timeline, format_timeline
from .executor import PipelineExecutor
from .p2p import TensorSpec, batches_complete_in_lockstep, check_message_order, group_steps
from .schedules import (
    Action,
    schedule_1f1b,
    schedule_forward_only,
    schedule_gpipe,
    schedule_interleaved_1f1b,
    validate_schedules,
)
from .simulate import OpRecord, Timeline, simulate

__all__ = [
    "Action",
    "OpRecord",
    "PipelineExecutor",
    "TensorSpec",
    "Timeline",
    "batches_complete_in_lockstep",
    "check_message_order",
    "draw_timeline",
    "format_timeline",
    "group_steps",
    "schedule_1f1b",
    "schedule_forward_only",
    "schedule_gpipe",
    "schedule_interleaved_1f1b",
    "simulate",
    "validate_schedules",
]
