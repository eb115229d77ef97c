"""The training loop of one rank: everything composed.

    ParallelDims (dp x cp x tp x pp) -> data (sampler sharded over DP; each CP rank keeps its
    zigzag shard of every sequence) -> `parallelize(DeepSeekLM)` (this rank's chunks: fused
    ops, TP/SP, CP, pipeline split, its slices of the seeded weights, ZeRO-1 over dp x cp)
    -> per step: pipeline schedule over M micro-batches with fp32 grad accumulation ->
    ZeRO-1 reduce-scatter started in the last backward -> clipped AdamW on the shard ->
    all-gather -> metrics. At the end: validation, a generated sample, and one final model,
    `<out>/model.safetensors`: the fp32 master weights under the shard plan's names (the same
    values as the last checkpoint's `master/` tensors, whatever `train.precision` was).
    `train.init_from` starts from a Hugging Face folder's weights instead of the seeded init.

`train(cfg)` runs in every rank (after `torch.distributed` is initialised, or in a single
process); `haillm.trainer.launch` starts the ranks.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from haillm.parallel import ParallelDims, split_sequence
from haillm.trainer.checkpoint import Checkpointer, logical_tensors
from haillm.trainer.config import Config, ConfigError, dump_toml
from haillm.trainer.data import Sampler, build_dataset_on_nodes
from haillm.trainer.metrics import (
    MetricsLogger,
    device_peak_flops,
    end_progress_line,
    flops_per_token,
)
from haillm.trainer.model import DeepSeekLM
from haillm.trainer.optim import Optimizer, lr_at
from haillm.trainer.parallelize import DTYPES, parallelize
from haillm.trainer.pipeline_exec import PipelineStep, StepTimes

__all__ = ["DTYPES", "GracefulStop", "check_device", "evaluate", "train"]


def _world_sums(xs: list[float], dims: ParallelDims) -> list[float]:
    """Element-wise sums over all ranks (one all-reduce)."""
    if dims.world_size == 1:
        return list(xs)
    # NCCL reduces only CUDA tensors; gloo takes CPU ones
    dev = torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend() == "nccl") else torch.device("cpu")
    t = torch.tensor(xs, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def _world_sum(x: float, dims: ParallelDims) -> float:
    return _world_sums([x], dims)[0]


def _reports_loss(dims: ParallelDims) -> bool:
    """Whether this rank's loss enters the logged mean: the last stage's TP rank 0 of every
    (dp, cp) position (the TP ranks of one position hold the same vocab-parallel loss)."""
    return dims.is_last_stage and dims.tp_rank == 0


def _loss_mean(loss_sum: float, dims: ParallelDims) -> float:
    """The logged loss from the world sum of the reporting ranks' losses: their mean over the
    dp x cp positions. Each is the mean over B*S/cp tokens (equal counts: no padding), so
    this is the mean over the whole global batch, as one process would compute it."""
    return loss_sum / (dims.dp * dims.cp)


def _cp_shard(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """This CP rank's zigzag shard (B, S/cp) of a micro-batch's tokens or targets (B, S):
    chunks cp_rank and 2cp-1-cp_rank of 2cp (`haillm.parallel.split_sequence`)."""
    if dims.cp == 1:
        return t
    return split_sequence(t, dim=1, group=dims.cp_group, load_balance=True)


class GracefulStop:
    """SIGINT / SIGTERM handlers for the training loop (installed in the main thread only).

    The first signal only sets `signum`: the loop finishes the step it is in, every rank
    agrees on that step (the flags are summed with the step's loss, no extra collective),
    saves a checkpoint and returns. A second signal, at least `debounce_s` later (one Ctrl-C
    reaches a rank from the terminal and again from the launcher within milliseconds),
    stops at once: `KeyboardInterrupt` for SIGINT, `SystemExit(143)` for SIGTERM.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log=None, debounce_s: float = 1.0):
        self.log, self.debounce_s = log, debounce_s
        self.signum: int | None = None
        self._t = 0.0
        self._old: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._t = signum, now
            if self.log:
                self.log(f"haillm-train: {signal.Signals(signum).name} received: finishing "
                         "this step, then saving a checkpoint (interrupt again to stop at "
                         "once, losing the steps since the last checkpoint)")
            return
        if now - self._t < self.debounce_s:
            return  # the same signal, delivered twice
        self.__exit__()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


@torch.no_grad()
def evaluate(step: PipelineStep, ds, dims: ParallelDims, cfg: Config, device) -> float:
    """Mean loss over `eval_batches` global batches of held-out windows: the pipeline's
    forward-only schedule over this DP rank's share (every virtual stage, interleaved too)."""
    mbs = cfg.micro_batch_size
    idx = ds.val_indices(cfg.train.eval_batches * cfg.train.global_batch)
    per_rank = len(idx) // dims.dp
    mine = idx[dims.dp_rank * per_rank:(dims.dp_rank + 1) * per_rank]
    batches = [ds.val_batch(mine[j:j + mbs]) for j in range(0, len(mine), mbs)]
    losses = step.evaluate([_cp_shard(x, dims).to(device) for x, _ in batches],
                           [_cp_shard(y, dims).to(device) for _, y in batches])
    mine_loss = sum(losses) / max(len(losses), 1) if _reports_loss(dims) else 0.0
    return _loss_mean(_world_sum(mine_loss, dims), dims)


@torch.no_grad()
def _gather_model(chunks, opt: Optimizer, dims: ParallelDims, cfg: Config) -> DeepSeekLM | None:
    """The full model of fp32 master weights on global rank 0 (None elsewhere). Collective."""
    master = opt.opt.full_state_dict()["master"]  # this rank's parameters, over DP
    part = logical_tensors(chunks, master)  # full over TP (the shard plan's gather)
    if dims.world_size > 1:
        keep = part if (dims.dp_rank == 0 and dims.tp_rank == 0 and dims.cp_rank == 0) else None
        parts = [None] * dims.world_size if dims.rank == 0 else None
        dist.gather_object(keep, parts, dst=0)
        if dims.rank != 0:
            return None
        part = {k: v for p in parts if p for k, v in p.items()}
    model = DeepSeekLM(cfg.model, lazy=True)  # meta parameters: nothing drawn, then replaced
    model.load_state_dict({k: v.float().cpu() for k, v in part.items()}, assign=True)
    return model.eval()


@torch.no_grad()
def _masters_from(source, chunks, opt: Optimizer) -> None:
    """The fp32 master weights of an `--init-from` run, read again from the folder: the
    optimizer would otherwise take them from the bf16/fp16 training copy that `parallelize`
    made, whose low bits are gone (a continued run must start from the folder's exact
    weights). Moments start at zero, step 0."""
    from haillm.trainer.shard_plan import param_specs

    specs, dims = param_specs(chunks.local.cfg), chunks.dims
    master = {n: source.local(n, specs[n], dims.tp_rank, dims.tp).float()
              for n, _ in chunks.local.named_parameters()}
    zeros = {n: torch.zeros_like(v) for n, v in master.items()}
    opt.opt.load_full_state_dict({
        "master": master, "exp_avg": zeros, "exp_avg_sq": zeros, "num_steps": 0,
        "param_groups": [{k: v for k, v in g.items() if k != "params"}
                         for g in opt.opt.param_groups], "loss_scaler": None})


def check_device(cfg: Config, nproc: int = 1) -> None:
    """Raise `ConfigError` when `run.device` cannot host `nproc` local ranks (before any
    expensive work: tokenising, launching)."""
    if cfg.run.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch "
                              "(torch.cuda.is_available() is False); use --device cpu")
        if torch.cuda.device_count() < nproc:
            raise ConfigError(f"--device cuda: {nproc} local ranks need {nproc} GPUs, "
                              f"{torch.cuda.device_count()} visible")


def _say(stream):
    return lambda s: (end_progress_line(), print(s, file=stream or sys.stderr, flush=True))


def train(cfg: Config, *, stream=None, overwrite: bool = False) -> dict:
    """Run the configured training on this rank; returns a summary (losses on rank 0).

    A run folder that holds another run is refused (`ConfigError`) unless `run.resume`
    continues it or `overwrite` moves it aside (`haillm.trainer.runfolder`). SIGINT/SIGTERM
    stop gracefully after the current step with a checkpoint (`summary["stopped"]`).
    """
    from haillm.trainer.runfolder import prepare_run_folder

    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.train.init_from:  # the model shape (and tokenizer) of the HF folder
        from haillm.trainer.hf import apply_init_from

        apply_init_from(cfg)
    cfg.validate(world)
    p, t, m = cfg.parallel, cfg.train, cfg.model
    check_device(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if world > 1 else 1)
    dims = ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp).build()
    out = Path(cfg.run.out)
    is_rank0 = dims.rank == 0
    t_start = time.perf_counter()
    problem = [None]
    if is_rank0:
        try:
            prepare_run_folder(cfg, log=_say(stream), overwrite=overwrite)
        except (ConfigError, OSError) as e:
            problem = [str(e)]
    if dims.world_size > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ConfigError(problem[0])
    if is_rank0:
        (out / "config.toml").write_text(dump_toml(cfg), encoding="utf-8")
    device = torch.device(cfg.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())

    # ---- data: every node's local rank 0 tokenises (or finds the cache) in its own `out`,
    # the node's other ranks read it: no shared filesystem needed
    ds, tok = build_dataset_on_nodes(cfg.data, m.vocab_size, m.seq_len, out)

    # ---- model: every rank builds the same seeded DeepSeekLM on the meta device (structure,
    # no memory); parallelize keeps this rank's chunks and draws only the slices it owns
    dtype = DTYPES[t.precision]
    # with --init-from each rank reads its own slices from the memory-mapped safetensors
    source = None
    if t.init_from:
        from haillm.trainer.hf import HFReader

        source = HFReader(t.init_from, m)
    chunks = parallelize(DeepSeekLM(m, seed=t.seed, lazy=True), dims, cfg, source=source)
    opt = Optimizer(chunks, t)
    if source is not None:
        if t.precision != "fp32":
            _masters_from(source, chunks, opt)
        source.close()
    mbs = cfg.micro_batch_size
    s_local = m.seq_len // p.cp  # CP: this rank's zigzag shard of every sequence
    s_local //= p.tp if (p.sequence_parallel and p.tp > 1) else 1  # SP splits it over TP
    act_shape = (mbs, s_local, m.hidden_size)  # the residual stream between stages
    v = len(chunks)
    pkg_step = PipelineStep(chunks, schedule=p.pipeline_schedule, act_shape=act_shape,
                            dtype=dtype, device=device, scale_loss=opt.opt.scale_loss,
                            on_last_backward=opt.start_last_microbatch)
    sched_src = (f"haillm.pipeline.PipelineExecutor ({p.pipeline_schedule}"
                 f"{f', {v} chunks per stage' if v > 1 else ''})")
    sampler = Sampler(ds.n_train, t.global_batch, t.seed)
    ckpt = Checkpointer(cfg, chunks, opt, sampler, stream=stream, keep=cfg.run.keep_checkpoints)
    start = ckpt.resume() if cfg.run.resume else 0  # reshards if the layout changed

    tokens_per_step = t.global_batch * m.seq_len
    flops_step = flops_per_token(m) * tokens_per_step
    peak, peak_src = device_peak_flops(device.type, t.precision, dims.world_size)
    log = MetricsLogger(out, t.steps, enabled=is_rank0, tensorboard=cfg.run.tensorboard,
                        log_every=cfg.run.log_every, stream=stream)
    if is_rank0:
        say = (lambda s: print(s, file=stream, flush=True))
        cp = f" cp={p.cp}" if p.cp > 1 else ""
        say(f"haillm-train: {m.n_params() / 1e6:.2f}M params | layout dp={p.dp}{cp} tp={p.tp} "
            f"pp={p.pp} (world {dims.world_size}) | {p.microbatches} micro-batches of {mbs} x "
            f"{m.seq_len} tokens | {t.precision} | {ds.n_train} train / {ds.n_val} val windows")
        wiring = {"rank grid": "haillm.parallel.ParallelDims", **chunks.wiring,
                  "pipeline schedule": sched_src, "optimizer": opt.description,
                  "MFU peak": peak_src}
        for k, val in wiring.items():
            say(f"  {k:>28}: {val}")

    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    last = t.steps if not cfg.run.exit_after else min(cfg.run.exit_after, t.steps)
    stop = GracefulStop(log=_say(stream) if is_rank0 else None)
    done, saved = start, None
    with stop:
        for step in range(start, last):
            t0 = time.perf_counter()
            opt.comm_time = 0.0
            times = StepTimes()
            idx = sampler.next_global()
            micro = Sampler.shard(idx, p.dp, dims.dp_rank, p.microbatches)
            batches = [ds.batch(mb) for mb in micro]
            # the CP ranks of one DP rank got the same sequences; each keeps its chunks
            xs = [_cp_shard(b[0], dims).to(device) for b in batches]
            ys = [_cp_shard(b[1], dims).to(device) for b in batches]
            lr = lr_at(step, t)
            loss_sum = pkg_step(xs, ys, times=times)
            gnorm, found_inf = opt.step(lr)
            mine = loss_sum.item() if _reports_loss(dims) else 0.0
            # the stop requests ride along with the loss: every rank stops after the same step
            n_int, n_term = float(stop.signum == signal.SIGINT), float(stop.signum == signal.SIGTERM)
            loss, n_int, n_term = _world_sums([mine, n_int, n_term], dims)
            loss = _loss_mean(loss, dims)
            stops = n_int + n_term
            if not math.isfinite(loss) and t.precision != "fp16":
                raise FloatingPointError(f"non-finite loss {loss} at step {step + 1}")
            if found_inf and t.precision != "fp16":  # no loss scaler to back off: stop, don't skip
                raise FloatingPointError(f"non-finite gradient norm {gnorm} at step {step + 1} "
                                         f"({t.precision}: only fp16 skips such steps)")
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gnorm,
                   "tokens_per_s": tokens_per_step / dt, "mfu": flops_step / dt / peak,
                   "step_time_s": dt, "comm_s": opt.comm_time + times.p2p,
                   "compute_s": times.compute,
                   "comm_fraction": (opt.comm_time + times.p2p) / dt, "skipped": bool(found_inf)}
            if t.precision == "fp16":
                rec["loss_scale"] = opt.loss_scale
            if t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
                val = evaluate(pkg_step, ds, dims, cfg, device)
                rec["val_loss"] = val
                val_losses.append((step + 1, val))
            losses.append(loss)
            log.log(rec)
            if found_inf and is_rank0:
                print(f"haillm-train: step {step + 1}: non-finite gradients, update skipped "
                      f"(loss scale now {rec.get('loss_scale')})", file=stream, flush=True)
            done = step + 1
            if stops > 0 or ckpt.should_save(done, last):
                saved = ckpt.save(done)
            if stops > 0:
                if stop.signum is None:  # another rank got the signal: this one stops with it
                    stop.signum = signal.SIGINT if n_int else signal.SIGTERM
                break
    log.close()
    summary = {"losses": losses, "val_losses": val_losses, "sample": None,
               "state_bytes": opt.state_bytes(), "step": done, "stopped": None,
               "checkpoint": str(saved) if saved else None,
               "tokens": done * tokens_per_step, "start_step": start}
    if stop.signum is not None and done < last:
        # a graceful stop: the checkpoint is what matters (preemption is near); no export
        summary["stopped"] = stop.name
        if is_rank0:
            _say(stream)(f"haillm-train: stopped at step {done} ({stop.name}); saved {saved}; "
                         f"continue with --resume")
        return summary
    return _finish(summary, chunks, opt, dims, cfg, out, tok, stream, t_start)


def _finish(summary, chunks, opt, dims, cfg, out, tok, stream, t_start) -> dict:
    """End of the run: the unsharded weights, a sample, one summary line (rank 0)."""
    t, is_rank0 = cfg.train, dims.rank == 0
    model = _gather_model(chunks, opt, dims, cfg)  # collective: every rank takes part
    if is_rank0 and model is not None:
        try:
            import json

            from safetensors.torch import save_file

            # the fp32 master weights (what the checkpoints hold), never the bf16/fp16 compute
            # copies: one final model per run; `haillm-export --hf` converts it for transformers
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(out / "model.safetensors"),
                      metadata={"format": "pt", "haillm_weights": "fp32 master weights",
                                "step": str(summary["step"]),
                                "config": json.dumps(cfg.to_dict())})
        except ImportError:  # pragma: no cover
            torch.save(model.state_dict(), out / "model.pt")
        if cfg.run.sample_tokens and tok is not None:
            prompt = tok.encode(cfg.run.sample_prompt).ids or [0]
            g = torch.Generator().manual_seed(t.seed)
            ids = model.generate(torch.tensor([prompt]), cfg.run.sample_tokens, generator=g)
            text = tok.decode(ids[0].tolist())
            summary["sample"] = text
            print("---- sample " + "-" * 60 + "\n" + text + "\n" + "-" * 72,
                  file=stream, flush=True)
    if is_rank0:
        from haillm.trainer.metrics import fmt_time

        losses, vals = summary["losses"], summary["val_losses"]
        loss = f"final train loss {losses[-1]:.4f}" if losses else "no step run"
        val = f", val loss {vals[-1][1]:.4f}" if vals else ""
        ran = summary["step"] - summary["start_step"]
        what = (f"{ran} steps" + (f" (resumed at step {summary['start_step']})"
                                  if summary["start_step"] else ""))
        ck = (f", newest checkpoint {summary['checkpoint']}" if summary["checkpoint"] else "")
        print(f"haillm-train: done: step {summary['step']}/{t.steps}, {what} in "
              f"{fmt_time(time.perf_counter() - t_start)}; {loss}{val}; "
              f"{summary['tokens']:,} tokens; model {out / 'model.safetensors'}, metrics "
              f"{out / 'metrics.jsonl'}{ck}"
              + ("; continue with --resume" if summary["step"] < t.steps else ""),
              file=stream or sys.stdout, flush=True)
    return summary
