"""How much tensor/sequence-parallel communication hides behind the GEMMs (CPU, gloo).

A Megatron MLP block (ColumnParallelLinear → GeLU → RowParallelLinear) runs forward + backward
on `--ranks` gloo ranks, in two layouts:

* TP      : replicated input; the overlap is the column layer's async input-gradient all-reduce
            behind its weight-gradient GEMM.
* TP + SP : sequence shards; additionally the all-gather before the column GEMM and the
            reduce-scatter after the row GEMM are chunked and pipelined (`--chunks`).

Each configuration runs with overlap off and on. A `Tracer` records when every collective and
GEMM starts and ends on rank 0; "hidden" is the fraction of communication time during which a
GEMM was running. Writes a table to docs/benchmarks/parallel.md and a timeline picture to
docs/benchmarks/img/parallel-overlap-timeline.png.

    OMP_NUM_THREADS=1 uv run python benchmarks/parallel_overlap.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import DOCS, device_name, write_table

from haillm.parallel import ColumnParallelLinear, RowParallelLinear, Tracer
from haillm.parallel.testing import run_distributed

IMG = DOCS / "img" / "parallel-overlap-timeline.png"


def _block(cfg, sp, overlap):
    torch.manual_seed(0)
    fc1 = torch.nn.Linear(cfg["h"], cfg["ffn"])
    fc2 = torch.nn.Linear(cfg["ffn"], cfg["h"])
    kw = dict(sequence_parallel=sp, overlap_sp_comm=overlap, sp_chunks=cfg["chunks"])
    col = ColumnParallelLinear.from_full(fc1, overlap_grad_comm=overlap, **kw)
    row = RowParallelLinear.from_full(fc2, **kw)
    return col, row


def _step(col, row, x):
    y = row(F.gelu(col(x)))
    y.sum().backward()


def _merge(intervals):
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def hidden_fraction(events):
    """Share of communication time that overlaps some GEMM."""
    compute = _merge([(e.start, e.end) for e in events if e.kind == "compute"])
    comm = _merge([(e.start, e.end) for e in events if e.kind == "comm"])
    total = sum(e - s for s, e in comm)
    hidden = sum(max(0.0, min(e, ce) - max(s, cs)) for s, e in comm for cs, ce in compute)
    return (hidden / total if total else 0.0), total


def _rank_main(cfg):
    t, r = dist.get_world_size(), dist.get_rank()
    configs = [(sp, overlap) for sp in (False, True) for overlap in (False, True)]
    setups = {}
    for sp, overlap in configs:
        col, row = _block(cfg, sp, overlap)
        x = torch.randn(cfg["s"], cfg["b"], cfg["h"], generator=torch.Generator().manual_seed(1))
        # requires_grad: inside a model the layers below need dL/dx (the comm to hide)
        x = (x.chunk(t, 0)[r] if sp else x).contiguous().requires_grad_(True)
        setups[(sp, overlap)] = (col, row, x)
        for _ in range(cfg["warmup"]):
            _step(col, row, x)
    # Interleave the configurations step by step: the shared machine's load drifts over time,
    # and interleaving exposes every configuration to the same drift.
    steps = {c: [] for c in configs}
    for _ in range(cfg["iters"]):
        for c in configs:
            col, row, x = setups[c]
            dist.barrier()  # start together: otherwise rank skew reads as communication time
            with Tracer() as tr:
                t0 = time.perf_counter()
                _step(col, row, x)
                ms = (time.perf_counter() - t0) * 1e3
            time.sleep(0.02)  # late future callbacks
            steps[c].append((ms, hidden_fraction(tr.events), list(tr.events)))
    results = {}
    for c in configs:
        ms_sorted = sorted(steps[c], key=lambda z: z[0])
        ms, (frac, comm_s), events = ms_sorted[len(ms_sorted) // 2]  # the median step
        results[c] = dict(
            ms=ms, hidden=statistics.median(h[0] for _, h, _ in steps[c]),
            comm_ms=comm_s * 1e3,
            gemm_ms=sum(e.duration for e in events if e.kind == "compute") * 1e3,
            events=[(e.kind, e.name, e.start, e.end) for e in events],
        )
    return results


def plot(res, cfg, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 6.4), sharex=False)
    colors = {"compute": "#4C72B0", "comm": "#DD8452"}
    for ax, (sp, overlap) in zip(axes, [(False, False), (False, True), (True, False), (True, True)]):
        ev = res[(sp, overlap)]["events"]
        t0 = min(s for _, _, s, _ in ev)
        for row_i, kind in enumerate(("compute", "comm")):
            bars = [((s - t0) * 1e3, (e - s) * 1e3) for k, _, s, e in ev if k == kind]
            ax.broken_barh(bars, (row_i * 10 + 1, 8), facecolors=colors[kind],
                           edgecolors="white", linewidth=0.5)
        ax.set_yticks([5, 15], ["GEMM", "comm"])
        r = res[(sp, overlap)]
        ax.set_title(f"{'TP+SP' if sp else 'TP'}, overlap {'on' if overlap else 'off'}: "
                     f"step {r['ms']:.1f} ms, comm hidden {100 * r['hidden']:.0f}%",
                     fontsize=9, loc="left")
        ax.set_ylim(0, 20)
    axes[-1].set_xlabel("time since the step started (ms), rank 0, one forward + backward")
    fig.suptitle(f"MLP block s={cfg['s']} b={cfg['b']} h={cfg['h']} ffn={cfg['ffn']}, "
                 f"{cfg['ranks']} gloo ranks (CPU)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chunks", type=int, default=4)
    args = ap.parse_args()
    cfg = dict(s=256, b=2, h=512, ffn=2048, chunks=args.chunks, warmup=2, iters=10,
               ranks=args.ranks)
    if args.quick:
        cfg.update(s=64, h=128, ffn=512, iters=3, warmup=1)
    res = run_distributed(_rank_main, args.ranks, cfg, start_method="fork", timeout=600)[0]
    t = args.ranks
    s, b, h, f = cfg["s"], cfg["b"], cfg["h"], cfg["ffn"]
    flops = 3 * 2 * (2 * s * b * h * f) / t  # fwd + 2 bwd GEMMs, 2 layers, per rank
    rows = []
    for sp in (False, True):
        off, on = res[(sp, False)], res[(sp, True)]
        for overlap, r in ((False, off), (True, on)):
            rows.append([
                "TP+SP" if sp else "TP", "on" if overlap else "off", f"{r['ms']:.1f}",
                f"{r['gemm_ms']:.1f}", f"{r['comm_ms']:.1f}", f"{100 * r['hidden']:.0f}%",
                f"{flops / (r['ms'] * 1e-3) / 1e9:.1f}",
                f"{off['ms'] / r['ms']:.2f}x",
            ])
    table = write_table(
        "parallel.md",
        "Communication overlap (CPU, gloo)",
        ["layout", "overlap", "step ms (median)", "GEMM ms", "comm ms", "comm hidden",
         "GFLOP/s per rank", "speed-up vs off"],
        rows,
        notes=(
            f"MLP block column → GeLU → row, s={s}, b={b}, h={h}, ffn={f}, fp32, {t} gloo ranks "
            f"on {device_name()}, one intra-op thread per rank; forward + backward, median of "
            f"{cfg['iters']} steps (configurations interleaved step by step). Overlap on = async input-gradient reduction in the column "
            f"backward + (SP) {cfg['chunks']}-chunk pipelined all-gather / reduce-scatter. "
            "GEMM/comm ms come from the median step on rank 0 and 'hidden' is the median over steps (comm end = the "
            "moment the Work's future completes; 'hidden' = share of comm time during which a "
            "GEMM ran). The machine is shared (2 cores for several jobs), so absolute numbers "
            "are noisy; the speed-up column compares runs of the same process. Timeline: "
            "![timeline](img/parallel-overlap-timeline.png)"
        ),
    )
    plot(res, cfg, IMG)
    print(table)


if __name__ == "__main__":
    main()
