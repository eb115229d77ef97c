"""Measured pipeline bubble (CPU, gloo) vs the simulation vs the formula; activation memory.

    OMP_NUM_THREADS=1 uv run python benchmarks/pipeline_bubble.py [--quick]

1. Bubble: for p = 2, 4 and m = 4, 8, 16, an MLP stack split into p stages runs 1F1B on p
   gloo ranks (one thread each) with timestamps recorded around every forward/backward. The
   measured bubble is ``1 - busy / (p * makespan)`` from those timestamps; the simulation
   replays the same schedules with each stage's *measured* mean forward/backward times and free
   communication; the formula is ``(p - 1) / (m + p - 1)``. Measured minus simulated is what
   communication and scheduling noise cost.
2. Memory: peak resident-set growth of each rank during one 1F1B and one GPipe step
   (p = 4, m = 8), against the prediction "peak in-flight micro-batches x activation bytes of
   one micro-batch" (the bytes autograd saves, counted with saved-tensor hooks).

Writes tables into docs/benchmarks/pipeline.md and SVG timelines into docs/benchmarks/img/.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import resource
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from harness import DOCS, device_name, write_table  # noqa: E402

from haillm.parallel.testing import run_distributed  # noqa: E402
from haillm.pipeline import (  # noqa: E402
    PipelineExecutor,
    draw_timeline,
    schedule_interleaved_1f1b,
    simulate,
)

PAGE = "pipeline.md"
IMG = DOCS / "img"


def make_stage(hidden: int, layers: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(hidden, hidden), nn.GELU()]
    return nn.Sequential(*mods)


def _mse(out, target):
    return ((out - target) ** 2).mean()


def bubble_rank(schedule: str, m: int, mb: int, hidden: int, layers: int, repeats: int,
                v: int = 1):
    """One rank: `repeats` timed steps after a warm-up; returns the gathered timelines.

    With ``v > 1`` the stage's layers are split into ``v`` chunks (same work per rank).
    """
    p, s = dist.get_world_size(), dist.get_rank()
    stage = make_stage(hidden, layers, seed=s) if v == 1 else [
        make_stage(hidden, layers // v, seed=10 * s + c) for c in range(v)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(mb, hidden, generator=g) for _ in range(m)]
    ex = PipelineExecutor(stage, loss_fn=_mse, tensor_shapes=(mb, hidden), schedule=schedule,
                          record=True)
    timelines = []
    for i in range(repeats + 1):
        ex.run(xs if s == 0 else None, xs if s == p - 1 else None, num_microbatches=m)
        tl = ex.gather_timeline()
        if i > 0:  # the first step warms up allocator and connections
            timelines.append(tl)
    return timelines


def _fixed_mmap_threshold(nbytes: int = 64 * 1024) -> None:
    """Make glibc hand every large block straight back to the OS when it is freed.

    By default glibc raises its mmap threshold after the first large free, and later tensors
    come from a heap that is never trimmed: the resident set then reflects fragmentation, not
    live bytes. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``) keeps RSS ~ live tensors.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD = -3
    except OSError:  # not glibc: measure anyway
        pass


def memory_rank(schedule: str, m: int, mb: int, hidden: int, layers: int):
    """One rank, one step: peak RSS growth (bytes) and the executor's peak in-flight count."""
    _fixed_mmap_threshold()
    p, s = dist.get_world_size(), dist.get_rank()
    stage = make_stage(hidden, layers, seed=s)
    for prm in stage.parameters():  # gradients exist before we start counting
        prm.grad = torch.zeros_like(prm)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(mb, hidden, generator=g) for _ in range(m)]
    ex = PipelineExecutor(stage, loss_fn=_mse, tensor_shapes=(mb, hidden), schedule=schedule)
    # Warm-up step with ONE micro-batch: pays the one-off costs (autograd threads, gloo
    # buffers, allocator arenas) with a single micro-batch's activations alive, so that the
    # growth of the high-water mark afterwards is what more micro-batches in flight add.
    ex.run(xs[:1] if s == 0 else None, xs[:1] if s == p - 1 else None, num_microbatches=1)
    gc.collect()
    dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ex.run(xs if s == 0 else None, xs if s == p - 1 else None, num_microbatches=m)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * 1024, ex.peak_inflight


def saved_bytes_per_microbatch(mb: int, hidden: int, layers: int) -> int:
    """Bytes autograd saves for one micro-batch through one stage.

    The stage's output is not counted: the executor releases it once it has been sent.
    """
    stage = make_stage(hidden, layers, seed=0)
    seen: dict[int, int] = {}
    params = {prm.untyped_storage().data_ptr() for prm in stage.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:  # weights are saved too, but they are not activations
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(torch.randn(mb, hidden, requires_grad=True))
    del out
    return sum(seen.values())


def summarize(timelines, p: int, m: int, v: int = 1):
    """Median-makespan run: measured bubble, simulated bubble with its measured op costs.

    The costs given to `simulate` are per action (per chunk when ``v > 1``).
    """
    tl = sorted(timelines, key=lambda t: t.makespan)[len(timelines) // 2]
    cost = {}
    for s in range(p):
        for kind in "FB":
            cost[(s, kind)] = statistics.mean(
                o.end - o.start for o in tl.ops if o.stage == s and o.action.kind == kind)
    scheds = [schedule_interleaved_1f1b(p, m, s, v) for s in range(p)]
    sim = simulate(scheds,
                   forward_time=lambda s, a: cost[(s, "F")],
                   backward_time=lambda s, a: cost[(s, "B")])
    tf = v * statistics.mean(cost[(s, "F")] for s in range(p))  # per whole stage
    tb = v * statistics.mean(cost[(s, "B")] for s in range(p))
    return tl, sim, tf, tb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer repeats")
    ap.add_argument("--part", choices=["all", "bubble", "memory"], default="all")
    args = ap.parse_args()
    hidden, layers, mb, repeats = (256, 2, 16, 2) if args.quick else (1024, 4, 64, 3)
    IMG.mkdir(parents=True, exist_ok=True)

    if args.part in ("all", "bubble"):
        bubble_table(args, hidden, layers, mb, repeats)
    if args.part in ("all", "memory"):
        memory_table(args)


def bubble_table(args, hidden: int, layers: int, mb: int, repeats: int) -> None:
    rows = []
    for p in (2, 4):
        for m in (4, 8, 16):
            timelines = run_distributed(bubble_rank, p, "1f1b", m, mb, hidden, layers, repeats,
                                        start_method="fork", timeout=600)[0]
            tl, sim, tf, tb = summarize(timelines, p, m)
            formula = (p - 1) / (m + p - 1)
            rows.append(["1F1B", p, m, f"{tf * 1e3:.2f}", f"{tb * 1e3:.2f}", f"{tl.makespan * 1e3:.1f}",
                         f"{tl.bubble_fraction:.3f}", f"{sim.bubble_fraction:.3f}", f"{formula:.3f}"])
            print(rows[-1], flush=True)
            if m == 8:
                draw_timeline(tl, IMG / f"pipeline-measured-p{p}-m{m}.svg", time_unit="s",
                              title=f"measured 1F1B, p={p}, m={m} (gloo, CPU): bubble "
                                    f"{tl.bubble_fraction:.1%}; simulated {sim.bubble_fraction:.1%}")
                draw_timeline(sim, IMG / f"pipeline-simulated-p{p}-m{m}.svg", time_unit="s",
                              title=f"simulated with the measured op times, p={p}, m={m}: bubble "
                                    f"{sim.bubble_fraction:.1%}")
    for p in (2, 4):  # interleaved, v = 2: each rank runs the same layers as two chunks
        m, v = 8, 2
        timelines = run_distributed(bubble_rank, p, "interleaved", m, mb, hidden, layers,
                                    repeats, v, start_method="fork", timeout=600)[0]
        tl, sim, tf, tb = summarize(timelines, p, m, v)
        formula = (p - 1) / (v * m + p - 1)
        rows.append([f"interleaved v={v}", p, m, f"{tf * 1e3:.2f}", f"{tb * 1e3:.2f}",
                     f"{tl.makespan * 1e3:.1f}", f"{tl.bubble_fraction:.3f}",
                     f"{sim.bubble_fraction:.3f}", f"{formula:.3f}"])
        print(rows[-1], flush=True)
    notes = (
        f"Machine: {device_name()}, shared with other jobs; every rank is one process with one "
        f"thread, gloo over loopback. Stage = {layers} x (Linear({hidden}, {hidden}) + GELU), "
        f"micro-batch {mb} x {hidden} fp32; median-makespan step of {repeats} after a warm-up. "
        "t_F, t_B: mean measured forward/backward time of one micro-batch on one stage. "
        "*Simulated*: `simulate` fed with each stage's measured mean t_F, t_B and free "
        "communication. *Formula*: (p - 1) / (m + p - 1), and (p - 1) / (v m + p - 1) for the "
        "interleaved rows (t_F, t_B there: per whole stage, i.e. v chunks). Measured minus simulated = "
        "communication, Python overhead and (with 4 ranks on fewer free cores) time slicing. "
        "Timelines: `img/pipeline-measured-p*-m8.svg`."
    )
    print(write_table(PAGE, "Bubble: measured vs simulated vs formula",
                      ["schedule", "p", "m", "t_F (ms)", "t_B (ms)", "step (ms)", "measured bubble",
                       "simulated bubble", "formula"], rows, notes))



def memory_table(args) -> None:
    mhidden, mlayers, mmb, mm, mp = (512, 2, 64, 8, 4) if args.quick else (1024, 4, 256, 8, 4)
    per_mb = saved_bytes_per_microbatch(mmb, mhidden, mlayers)
    mrows = []
    res = {}
    for schedule in ("gpipe", "1f1b"):
        res[schedule] = run_distributed(memory_rank, mp, schedule, mm, mmb, mhidden, mlayers,
                                        start_method="fork", timeout=600)
    for s in range(mp):
        g_bytes, g_peak = res["gpipe"][s]
        f_bytes, f_peak = res["1f1b"][s]
        # Growth over the 1-micro-batch warm-up: (peak in flight - 1) micro-batches more.
        mrows.append([s, g_peak, f"{g_bytes / 2**20:.1f}", f"{(g_peak - 1) * per_mb / 2**20:.1f}",
                      f_peak, f"{f_bytes / 2**20:.1f}", f"{(f_peak - 1) * per_mb / 2**20:.1f}",
                      f"{g_bytes / max(f_bytes, 1):.1f}x"])
    mnotes = (
        f"p = {mp}, m = {mm}; stage = {mlayers} x (Linear({mhidden}, {mhidden}) + GELU), "
        f"micro-batch {mmb} x {mhidden} fp32. *Measured*: growth of the rank's peak resident set "
        "during one step over its high-water mark after a warm-up step with one micro-batch "
        "(gradients pre-allocated; glibc's mmap threshold fixed at 64 KiB so that freed tensors "
        "leave the resident set), i.e. what the extra micro-batches in flight cost. "
        f"*Predicted*: (peak in-flight - 1) x {per_mb / 2**20:.2f} MiB, the bytes autograd saves "
        "for one micro-batch on one stage (saved-tensor hooks; sent outputs are released). "
        "GPipe keeps all m micro-batches alive on every stage; 1F1B keeps min(p - s, m). "
        "The prediction is a lower bound: the measured growth also holds messages in flight "
        "(a sent output lives until the receiver posts its receive; received gradients), "
        "the loss's saved tensors on the last stage, and allocator noise of a few MiB."
    )
    print(write_table(PAGE, "Activation memory: GPipe vs 1F1B",
                      ["stage", "GPipe in-flight", "GPipe measured (MiB)", "GPipe predicted (MiB)",
                       "1F1B in-flight", "1F1B measured (MiB)", "1F1B predicted (MiB)",
                       "GPipe / 1F1B (measured)"], mrows, mnotes))


if __name__ == "__main__":
    main()
