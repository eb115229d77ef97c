"""Optimisation: fp32 main grads, ZeRO-1 sharded AdamW, clipping, loss scaling, LR schedule.

`ShardedOptimizer` is the trainer's ZeRO-1 (DeepSeek section 2.4: "ZeRO-1 ... gradients
accumulated in fp32"), written against the same idea as `haillm.zero`:

* the stage's parameters are views into flat *bucket* buffers (reverse order, so the first
  bucket is ready first in backward); one fp32 main-grad buffer per bucket;
* after each micro-batch's backward, a parameter's low-precision `.grad` is added into its fp32
  slot and freed (gradient accumulation in fp32);
* during the **last** micro-batch's backward (the pipeline executor's hook switches it on), a
  bucket whose gradients are all in launches its asynchronous reduce-scatter (mean over DP)
  right away, overlapping the rest of the backward;
* `step()`: wait, unscale + inf check (fp16), global grad norm (shards over DP, TP-replicated
  norm weights counted once, summed over TP and PP), clip, fused AdamW on this rank's fp32
  master shard writing the new low-precision parameters in the same pass, all-gather.

With `zero=False` the reduce-scatter becomes an all-reduce and every rank updates everything
(plain data parallelism), the maths unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from haillm.trainer.config import TrainConfig
from haillm.trainer.grid import Grid, all_gather_into, reduce_scatter_into

__all__ = ["LossScaler", "ShardedOptimizer", "ZeroPackageOptimizer", "lr_at", "make_optimizer"]


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


class LossScaler:
    """Dynamic loss scaling for fp16: back off on inf/nan, grow after `interval` good steps."""

    def __init__(self, init_scale=2.0**16, growth=2.0, backoff=0.5, interval=1000):
        self.scale, self.growth, self.backoff, self.interval = init_scale, growth, backoff, interval
        self.good = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff
            self.good = 0
        else:
            self.good += 1
            if self.good % self.interval == 0:
                self.scale *= self.growth

    def state_dict(self):
        return {"scale": self.scale, "good": self.good}


def _adamw(master, grad, m, v, *, step, lr, b1, b2, eps, wd, param_copy):
    try:  # the fused pass from haillm.fusedops (contract: adamw_step_)
        from haillm.fusedops import adamw_step_
    except ImportError:  # pragma: no cover
        adamw_step_ = None
    if adamw_step_ is not None:
        adamw_step_(master, grad, m, v, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps,
                    weight_decay=wd, param_copy=param_copy)
        return
    master.mul_(1 - lr * wd)
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
    master.addcdiv_(m, denom, value=-lr / (1 - b1**step))
    if param_copy is not None:
        param_copy.copy_(master)


class _Bucket:
    def __init__(self, params, dtype, device, dp: int, *, decay: bool, replicated: bool):
        self.params, self.decay, self.replicated = params, decay, replicated
        n = sum(p.numel() for p in params)
        self.numel = -(-n // dp) * dp  # padded so that every DP rank owns an equal shard
        self.shard = self.numel // dp
        self.param_buf = torch.zeros(self.numel, dtype=dtype, device=device)
        self.grad_buf = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.views: dict[int, torch.Tensor] = {}
        off = 0
        for p in params:
            k = p.numel()
            self.param_buf[off:off + k].copy_(p.detach().flatten())
            p.data = self.param_buf[off:off + k].view_as(p)  # the param lives in the bucket
            self.views[id(p)] = self.grad_buf[off:off + k].view_as(p)
            off += k
        self.pending = 0
        self.work = None


class ShardedOptimizer:
    """ZeRO-1 AdamW over the DP group for one pipeline stage's parameters (see module doc)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, grid: Grid, *, zero: bool = True,
                 overlap: bool = True, bucket_mb: float = 4.0, sequence_parallel: bool = False):
        self.cfg, self.grid, self.zero, self.overlap = cfg, grid, zero, overlap
        self.sp = sequence_parallel and grid.tp > 1
        params = [p for p in model.parameters() if p.requires_grad]
        dtype, device = params[0].dtype, params[0].device
        dp = grid.dp if zero else 1
        self.buckets: list[_Bucket] = []
        # reverse order: the last layers' gradients are ready first in backward
        for replicated in (False, True):
            group = [p for p in reversed(params) if getattr(p, "tp_replicated", False) == replicated]
            cur, size = [], 0
            for p in group:
                cur.append(p)
                size += p.numel() * 4
                if size >= bucket_mb * 2**20:
                    self.buckets.append(_Bucket(cur, dtype, device, dp, decay=not replicated,
                                                replicated=replicated))
                    cur, size = [], 0
            if cur:
                self.buckets.append(_Bucket(cur, dtype, device, dp, decay=not replicated,
                                            replicated=replicated))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        r = grid.dp_rank if zero else 0
        self.master, self.exp_avg, self.exp_avg_sq = [], [], []
        for b in self.buckets:
            sl = b.param_buf[r * b.shard:(r + 1) * b.shard]
            self.master.append(sl.float().clone())
            self.exp_avg.append(torch.zeros(b.shard, device=device))
            self.exp_avg_sq.append(torch.zeros(b.shard, device=device))
        self.step_count = 0
        self.sync_now = False  # set by the pipeline hook for the last micro-batch's backward
        self.comm_time = 0.0
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    # ------------------------------------------------------------------ backward side
    def _on_grad(self, p: torch.Tensor) -> None:
        b = self.bucket_of[id(p)]
        b.views[id(p)].add_(p.grad)  # fp32 accumulation of the bf16/fp16/fp32 gradient
        p.grad = None
        if self.sync_now:
            b.pending -= 1
            if b.pending == 0 and self.overlap:
                self._launch(b)

    def start_last_microbatch(self) -> None:
        """Pipeline hook: the coming backward is the step's last; reduce buckets as they fill."""
        self.sync_now = True
        for b in self.buckets:
            b.pending = len(b.params)

    def _launch(self, b: _Bucket) -> None:
        if self.grid.dp == 1:
            return
        if self.zero:
            out = b.grad_buf[self.grid.dp_rank * b.shard:(self.grid.dp_rank + 1) * b.shard]
            b.rs_out = torch.empty_like(out)
            b.work = reduce_scatter_into(b.rs_out, b.grad_buf, group=self.grid.dp_group,
                                         async_op=True)
        else:
            b.work = dist.all_reduce(b.grad_buf, group=self.grid.dp_group, async_op=True)

    def finish_grad_sync(self) -> list[torch.Tensor]:
        """Wait for (or launch) every bucket's reduction; this rank's averaged grad shards."""
        import time

        t0 = time.perf_counter()
        shards = []
        dp = self.grid.dp
        for b in self.buckets:
            if dp > 1 and b.work is None:
                self._launch(b)
            if b.work is not None:
                b.work.wait()
                b.work = None
            if dp == 1:
                g = b.grad_buf
            elif self.zero:
                g = b.rs_out / dp
            else:
                g = b.grad_buf / dp
            if self.sp and b.replicated:  # SP: each TP rank saw only its part of the sequence
                g = g.contiguous()
                dist.all_reduce(g, group=self.grid.tp_group)
            shards.append(g)
        self.sync_now = False
        self.comm_time += time.perf_counter() - t0
        return shards

    # ------------------------------------------------------------------ optimizer side
    @torch.no_grad()
    def step(self, lr: float, *, inv_scale: float = 1.0) -> tuple[float, bool]:
        """Reduce, clip and update; returns (global grad norm, found_inf)."""
        import time

        shards = self.finish_grad_sync()
        if inv_scale != 1.0:
            for g in shards:
                g.mul_(inv_scale)
        sq = torch.zeros((), dtype=torch.float64, device=shards[0].device)
        for b, g in zip(self.buckets, shards):
            if b.replicated and self.grid.tp_rank != 0:
                continue  # the same norm weight lives on every TP rank: count it once
            if not self.zero and self.grid.dp_rank != 0:
                continue  # replicated over DP too: count once
            sq += g.double().pow(2).sum()
        t0 = time.perf_counter()
        if dist.is_initialized() and self.grid.world > 1:
            dist.all_reduce(sq)
        norm = sq.sqrt().item()
        self.comm_time += time.perf_counter() - t0
        found_inf = not math.isfinite(norm)
        if not found_inf:
            clip = self.cfg.grad_clip
            coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
            self.step_count += 1
            c, r = self.cfg, (self.grid.dp_rank if self.zero else 0)
            for i, (b, g) in enumerate(zip(self.buckets, shards)):
                if coef < 1.0:
                    g.mul_(coef)
                copy = b.param_buf[r * b.shard:(r + 1) * b.shard]
                _adamw(self.master[i], g, self.exp_avg[i], self.exp_avg_sq[i],
                       step=self.step_count, lr=lr, b1=c.beta1, b2=c.beta2, eps=c.eps,
                       wd=c.weight_decay if b.decay else 0.0, param_copy=copy)
            t0 = time.perf_counter()
            if self.zero and self.grid.dp > 1:
                for b in self.buckets:
                    r = self.grid.dp_rank
                    all_gather_into(b.param_buf, b.param_buf[r * b.shard:(r + 1) * b.shard].clone(),
                                    group=self.grid.dp_group)
            self.comm_time += time.perf_counter() - t0
        for b in self.buckets:
            b.grad_buf.zero_()
        return norm, found_inf

    def state_bytes(self) -> int:
        """Bytes of fp32 master weights and Adam moments held by this rank (12 per element)."""
        return sum(4 * (m.numel() + a.numel() + s.numel())
                   for m, a, s in zip(self.master, self.exp_avg, self.exp_avg_sq))


class ZeroPackageOptimizer:
    """The same interface as `ShardedOptimizer`, on `haillm.zero` (ZeroDataParallel + Zero1AdamW).

    What the trainer adds around the package: the sequence-parallel all-reduce of the norm
    weights' gradients over TP (each TP rank saw only its part of the sequence), the norm
    counted once per TP group, TP/PP groups in the global gradient norm, and the switch that
    the pipeline's last-backward hook flips.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, grid: Grid, *,
                 overlap: bool = True, bucket_mb: float = 4.0, sequence_parallel: bool = False,
                 precision: str = "bf16"):
        from haillm.zero import Zero1AdamW, ZeroDataParallel, weight_decay_groups

        self.cfg, self.grid = cfg, grid
        self.sp = sequence_parallel and grid.tp > 1
        self.zdp = ZeroDataParallel(model, dp_group=grid.dp_group, bucket_mb=bucket_mb,
                                    overlap=overlap)
        self.replicated = [n for n, p in model.named_parameters() if getattr(p, "tp_replicated",
                                                                             False)]
        rep = set(self.replicated)
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
        return self.opt.loss_scale

    def start_last_microbatch(self) -> None:
        self.zdp.set_grad_sync(True)

    @torch.no_grad()
    def step(self, lr: float, *, inv_scale: float = 1.0) -> tuple[float, bool]:
        import time

        t0 = time.perf_counter()
        self.zdp.finish_grad_sync()
        if self.sp:
            for name in self.replicated:
                dist.all_reduce(self.zdp.main_grad_of(name), group=self.grid.tp_group)
        self.comm_time += time.perf_counter() - t0
        for g in self.opt.param_groups:
            g["lr"] = lr
        res = self.opt.step()
        self.opt.zero_grad()
        self.zdp.set_grad_sync(False)
        return res.grad_norm, res.skipped

    def state_bytes(self) -> int:
        return 4 * (self.opt.master.numel() + self.opt.exp_avg.numel()
                    + self.opt.exp_avg_sq.numel())


def make_optimizer(model, cfg: TrainConfig, grid: Grid, *, zero: bool, overlap: bool,
                   sequence_parallel: bool, impl: str = "auto"):
    """`haillm.zero` when installed and ZeRO is on (impl auto/package), else the trainer's own.

    Returns (optimizer, description).
    """
    if zero and impl in ("auto", "package"):
        try:
            import haillm.zero as hz

            ok = hasattr(hz, "Zero1AdamW") and hasattr(hz, "ZeroDataParallel")
        except ImportError:
            ok = False
        if ok:
            return (ZeroPackageOptimizer(model, cfg, grid, overlap=overlap,
                                         sequence_parallel=sequence_parallel,
                                         precision=cfg.precision),
                    "haillm.zero ZeroDataParallel + Zero1AdamW (ZeRO-1, fp32 main grads)")
        if impl == "package":
            raise ImportError("parallel.zero_impl=package but haillm.zero has no Zero1AdamW")
        import warnings

        warnings.warn("haillm.zero.Zero1AdamW is not available; the trainer uses its own "
                      "ZeRO-1 optimizer", stacklevel=2)
    desc = ("trainer ZeRO-1 sharded AdamW" if zero else "trainer data-parallel AdamW") + \
        ", fp32 master + main grads"
    return ShardedOptimizer(model, cfg, grid, zero=zero, overlap=overlap,
                            sequence_parallel=sequence_parallel), desc
