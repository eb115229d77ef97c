"""Optimisation: `haillm.zero` (fp32 main grads, ZeRO-1 AdamW, clipping, loss scaling) and the
paper's learning-rate schedule.

The trainer composes, it does not re-implement: `parallelize` wrapped the chunks in
`haillm.zero.ZeroDataParallel` (fp32 main grads; ZeRO-1's reduce-scatter, or with ZeRO off
`shard=False`'s all-reduce, both started from the last micro-batch's backward); `Optimizer` is
a thin wrapper around `Zero1AdamW` (DeepSeek section 2.4: "ZeRO-1 ... gradients accumulated
in fp32") that adds only what a 3D layout needs:

* the global gradient norm over TP and PP as well (`model_parallel_groups`), with the norm
  weights that every TP rank holds counted once (`count_in_norm`, from the shard plan); not
  over CP: the CP ranks hold the same parameters, their ZeRO-1 shards are already summed over
  the dp x cp group the optimizer shards over (unsharded, every rank has the whole norm);
* no weight decay on the norm weights (the shard plan's replicated parameters);
* the switch the pipeline executor flips before the last micro-batch's backward
  (`start_last_microbatch`), which starts the bucketed reduction during that backward.
"""

from __future__ import annotations

import math
import time

import torch

from haillm.trainer.config import TrainConfig
from haillm.trainer.shard_plan import param_specs
from haillm.zero import Zero1AdamW, weight_decay_groups

__all__ = ["Optimizer", "lr_at"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warm-up over `warmup_steps`, then the paper's multi-step schedule (peak until 80 %
    of the steps, 31.6 % of peak until 90 %, then 10 %), or cosine down to `min_lr_ratio`.
    """
    peak, total = cfg.lr, max(cfg.steps, 1)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    if step < 0.8 * total:
        return peak
    return peak * (0.316 if step < 0.9 * total else 0.1)


class Optimizer:
    """ZeRO-1 AdamW (or plain DP) over this rank's chunks, on `haillm.zero`.

    Args:
        chunks: `parallelize`'s `ModelChunks` (its `data_parallel` wrapper holds the
            parameters as views of fp32-main-grad buckets).
        cfg: the `train` config (lr, betas, eps, weight decay, clipping, precision).

    Attributes:
        zdp: the `ZeroDataParallel`; opt: the `Zero1AdamW`; comm_time: seconds spent
            waiting for gradient communication since it was last reset.
    """

    def __init__(self, chunks, cfg: TrainConfig):
        dims = chunks.dims
        self.cfg, self.dims, self.zdp = cfg, dims, chunks.data_parallel
        specs = param_specs(chunks.local.cfg)

        def replicated(name: str) -> bool:  # norm weights: every TP rank holds them whole
            return specs[name].shard.kind == "replicated"

        self.opt = Zero1AdamW(
            self.zdp, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            weight_decay=cfg.weight_decay, precision=cfg.precision,
            param_groups=weight_decay_groups(chunks.local, cfg.weight_decay,
                                             no_decay=lambda n, p: replicated(n)),
            max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else None,
            model_parallel_groups=[g for g, n in ((dims.tp_group, dims.tp),
                                                  (dims.pp_group, dims.pp)) if n > 1],
            count_in_norm=lambda n, p: dims.tp_rank == 0 or not replicated(n))
        self.zdp.set_grad_sync(False)
        self.comm_time = 0.0
        over = "DP x CP" if dims.cp > 1 else "DP"  # parallelize step 7: the dp x cp group
        self.description = ("haillm.zero.Zero1AdamW (" + (f"fp32 master weights and moments "
                            f"sharded over {over}" if self.zdp_sharded else "unsharded: full "
                            f"fp32 state on every {over} rank") + ", fused AdamW, fp64 grad norm)")

    @property
    def zdp_sharded(self) -> bool:
        return bool(getattr(self.zdp, "shard", True))

    @property
    def loss_scale(self) -> float:
        """The fp16 loss scale (1.0 for bf16/fp32)."""
        return self.opt.loss_scale

    def start_last_microbatch(self) -> None:
        """Pipeline hook: the coming backward is the step's last; reduce buckets as they fill."""
        self.zdp.set_grad_sync(True)

    @torch.no_grad()
    def step(self, lr: float) -> tuple[float, bool]:
        """Finish the gradient sync, then clip and update; returns (grad norm, skipped)."""
        t0 = time.perf_counter()
        self.zdp.finish_grad_sync()
        self.comm_time += time.perf_counter() - t0
        for g in self.opt.param_groups:
            g["lr"] = lr
        res = self.opt.step()
        self.opt.zero_grad()
        self.zdp.set_grad_sync(False)
        norm = res.grad_norm
        return norm, bool(res.skipped) or not math.isfinite(norm)

    def state_bytes(self) -> int:
        """Bytes of fp32 master weights and Adam moments held by this rank (12 per element;
        8 with fp32 parameters, which are their own master weights)."""
        return sum(4 * t.numel() for t in self.opt.state_tensors())
