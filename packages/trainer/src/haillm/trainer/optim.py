"""Optimisation: `haillm.zero` (fp32 main grads, ZeRO-1 AdamW, clipping, loss scaling) and the
paper's learning-rate schedule.

The trainer composes, it does not re-implement: `Optimizer` is a thin wrapper around
`haillm.zero.ZeroDataParallel` + `Zero1AdamW` (DeepSeek section 2.4: "ZeRO-1 ... gradients
accumulated in fp32") that adds only what a 3D layout needs around them:

* the global gradient norm over TP and PP as well (`model_parallel_groups`), with the norm
  weights that every TP rank holds counted once (`count_in_norm`);
* the sequence-parallel norm-weight gradients (partial sums over the TP group) all-reduced by
  `haillm.parallel.register_sequence_parallel_grad_hooks`. These are tensor hooks: they run
  *before* the gradient is accumulated into `.grad`, hence before ZeRO's post-accumulate hook
  adds it into the fp32 main grad, so the main grad is already the full-sequence gradient;
* the switch the pipeline executor flips before the last micro-batch's backward
  (`start_last_microbatch`), which starts ZeRO's bucketed reduce-scatter during that backward.

**ZeRO off** (`parallel.zero = false`): the same two classes on a one-rank "DP group" (so
nothing is sharded and every rank keeps full fp32 master weights and moments), and one
all-reduce (mean) of the whole fp32 main-grad buffer over the real DP group before the step:
plain data parallelism with the maths unchanged, and no overlap (it is the baseline).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from haillm.parallel import all_reduce, register_sequence_parallel_grad_hooks
from haillm.trainer.config import TrainConfig
from haillm.trainer.grid import Grid
from haillm.zero import Zero1AdamW, ZeroDataParallel, weight_decay_groups

__all__ = ["Optimizer", "lr_at", "make_optimizer"]


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


def _own_rank_group(grid: Grid):
    """A process group holding only this rank (collective: every rank creates all of them)."""
    if not dist.is_initialized() or grid.world == 1:
        return None
    mine = None
    for r in range(grid.world):
        g = dist.new_group([r])
        if r == grid.rank:
            mine = g
    return mine


class Optimizer:
    """ZeRO-1 AdamW (or plain DP) for one pipeline stage's parameters, on `haillm.zero`.

    Args:
        model: the stage (its parameters become views of ZeRO's flat buffer).
        cfg: the `train` config (lr, betas, eps, weight decay, clipping).
        grid: the rank grid.
        zero: shard the fp32 master weights and moments over DP (else replicate them).
        overlap: launch each bucket's reduce-scatter from the backward hooks.
        sequence_parallel: all-reduce the SP-marked norm-weight gradients over TP.
        precision: ``bf16``, ``fp16`` (dynamic loss scaling in `Zero1AdamW`) or ``fp32``.

    Attributes:
        zdp: the `ZeroDataParallel` wrapper; opt: the `Zero1AdamW`; comm_time: seconds spent
            waiting for gradient communication since it was last reset.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, grid: Grid, *, zero: bool = True,
                 overlap: bool = True, bucket_mb: float = 4.0, sequence_parallel: bool = False,
                 precision: str = "bf16"):
        self.cfg, self.grid, self.zero = cfg, grid, zero
        self.sp = sequence_parallel and grid.tp > 1
        self._hooks = register_sequence_parallel_grad_hooks(model, grid.tp_group) if self.sp \
            else []
        dp_group = grid.dp_group if zero else _own_rank_group(grid)
        self.zdp = ZeroDataParallel(model, dp_group=dp_group, bucket_mb=bucket_mb,
                                    overlap=overlap)
        self.replicated = {n for n, p in model.named_parameters()
                           if getattr(p, "tp_replicated", False)}
        rep = self.replicated
        extra = [g for g, n in ((grid.tp_group, grid.tp), (grid.pp_group, grid.pp)) if n > 1]
        self.opt = Zero1AdamW(
            self.zdp, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            weight_decay=cfg.weight_decay, precision=precision,
            param_groups=weight_decay_groups(model, cfg.weight_decay,
                                             no_decay=lambda n, p: n in rep),
            max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else None,
            model_parallel_groups=extra,
            count_in_norm=lambda n, p: not (n in rep and grid.tp_rank != 0))
        self.zdp.set_grad_sync(False)
        self.comm_time = 0.0

    @property
    def loss_scale(self) -> float:
        """The fp16 loss scale (1.0 for bf16/fp32)."""
        return self.opt.loss_scale

    def start_last_microbatch(self) -> None:
        """Pipeline hook: the coming backward is the step's last; reduce buckets as they fill."""
        self.zdp.set_grad_sync(True)

    @torch.no_grad()
    def step(self, lr: float, *, inv_scale: float = 1.0) -> tuple[float, bool]:  # noqa: ARG002
        """Finish the gradient sync, then clip and update; returns (grad norm, skipped).

        `inv_scale` is accepted for the callers' sake: `Zero1AdamW` unscales by its own scaler.
        """
        t0 = time.perf_counter()
        self.zdp.finish_grad_sync()
        if not self.zero and self.grid.dp > 1:  # plain DP: mean of the full main grads
            all_reduce(self.zdp.main_grad, self.grid.dp_group)
            self.zdp.main_grad.mul_(1.0 / self.grid.dp)
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


ZeroPackageOptimizer = Optimizer  # the name before the trainer's own ZeRO-1 was removed


def make_optimizer(model, cfg: TrainConfig, grid: Grid, *, zero: bool, overlap: bool,
                   sequence_parallel: bool, precision: str | None = None):
    """The stage's `Optimizer` and a one-line description of what runs.

    Returns (optimizer, description).
    """
    opt = Optimizer(model, cfg, grid, zero=zero, overlap=overlap,
                    sequence_parallel=sequence_parallel, precision=precision or cfg.precision)
    what = ("haillm.zero ZeroDataParallel + Zero1AdamW (ZeRO-1 over DP" if zero else
            "haillm.zero ZeroDataParallel + Zero1AdamW unsharded + DP all-reduce (ZeRO off")
    return opt, what + ", fp32 main grads and master weights)"
