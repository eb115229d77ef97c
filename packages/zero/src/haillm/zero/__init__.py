"""haillm.zero: ZeRO-1 sharded optimizer, fp32 gradient accumulation and bf16/fp16 mixed precision.

* `ZeroDataParallel`: flat fp32 main-grad buffer, gradient accumulation in fp32, bucketed
  reduce-scatter overlapped with the last micro-batch's backward.
* `Zero1AdamW`: fp32 master weights and Adam moments sharded over data parallelism, fused
  update writing the bf16 parameters, all-gather; clipping (float64 norm) and loss scaling.
* ``ZeroDataParallel(shard=False)``: plain data parallelism on the same buffers: bucketed
  all-reduce overlapped with backward, full optimizer state on every rank, no all-gather.
* `DynamicLossScaler`: fp16 loss scaling.
* `haillm.zero.reference`: the teaching versions (single-process mixed precision, naive ZeRO-1).
"""

from haillm.zero.data_parallel import ZeroDataParallel
from haillm.zero.layout import Bucket, Layout, Segment, build_layout
from haillm.zero.loss_scaler import DynamicLossScaler
from haillm.zero.memory import memory_per_rank
from haillm.zero.optimizer import StepResult, Zero1AdamW, weight_decay_groups

__all__ = [
    "Bucket",
    "DynamicLossScaler",
    "Layout",
    "Segment",
    "StepResult",
    "Zero1AdamW",
    "ZeroDataParallel",
    "build_layout",
    "memory_per_rank",
    "weight_decay_groups",
]
