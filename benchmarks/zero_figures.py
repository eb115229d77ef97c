"""Figures for docs/tutorials/zero-and-mixed-precision.md (from a real 2-rank gloo run).

    nice uv run python benchmarks/zero_figures.py

Writes docs/tutorials/img/zero-overlap.png: (top) the flat fp32 main-grad buffer cut into
buckets and per-rank chunks; (bottom) the last micro-batch's backward on rank 0: when each
parameter's gradient was ready and when each bucket's reduce-scatter was in flight.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from haillm.parallel.testing import run_distributed
from haillm.zero import Zero1AdamW, ZeroDataParallel

OUT = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img" / "zero-overlap.png"


def traced_run(width: int = 384, layers: int = 6, micro: int = 2):
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers)
                            for m in (nn.Linear(width, width), nn.GELU())])
    ddp = ZeroDataParallel(model, bucket_mb=1.2)
    opt = Zero1AdamW(ddp, lr=1e-3, precision="fp32")
    xs = torch.randn(micro, 64, width)
    for it in range(2):  # the second iteration is the one we draw (warm)
        ddp.trace = [] if it == 1 else None
        for k in range(micro):
            ddp.set_grad_sync(k == micro - 1)
            if k == micro - 1 and ddp.trace is not None:
                ddp.trace.append(("backward_start", k, __import__("time").perf_counter_ns()))
            ddp(xs[k]).square().mean().backward()
            if k == micro - 1 and ddp.trace is not None:
                ddp.trace.append(("backward_end", k, __import__("time").perf_counter_ns()))
        opt.step()
        opt.zero_grad()
    layout = [(b.start, b.numel, list(b.params)) for b in ddp.layout.buckets]
    return ddp.trace, layout, ddp.layout.numel, dist.get_world_size(), ddp.layout.param_bucket


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace, layout, numel, dp, param_bucket = run_distributed(traced_run, 2, start_method="fork")[0]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 4.6), gridspec_kw={"height_ratios": [1, 2.2]})
    colors = plt.cm.tab10.colors
    for b, (start, n, _) in enumerate(layout):
        for r in range(dp):
            ax0.barh(0, n / dp, left=start + r * n / dp, color=colors[b % 10],
                     alpha=0.55 if r else 0.9, edgecolor="white")
            ax0.text(start + (r + 0.5) * n / dp, 0, f"bucket {b}\nrank {r}", ha="center",
                     va="center", fontsize=7)
    ax0.set_xlim(0, numel)
    ax0.set_yticks([])
    ax0.set_xlabel("flat fp32 main-grad buffer (elements; last layers first)")
    ax0.set_title("Buckets in reverse parameter order; rank r owns chunk r of each bucket",
                  fontsize=9)

    t0 = next(t for e, _, t in trace if e == "backward_start")
    ms = lambda t: (t - t0) / 1e6  # noqa: E731
    end = next(ms(t) for e, _, t in trace if e == "backward_end")
    ax1.axvspan(0, end, color="0.9", label="last micro-batch backward")
    for e, i, t in trace:
        if e == "grad_ready" and ms(t) >= 0:  # the last micro-batch only
            ax1.plot([ms(t)], [1], marker="|", markersize=14, color=colors[param_bucket[i] % 10])
    starts = {i: ms(t) for e, i, t in trace if e == "reduce_scatter_start"}
    dones = {i: ms(t) for e, i, t in trace if e == "reduce_scatter_done"}
    nb = len(starts)
    for b in starts:
        y = -0.25 * b
        ax1.barh(y, dones[b] - starts[b], left=starts[b], height=0.2, color=colors[b % 10])
        ax1.text(starts[b], y - 0.05, f"RS bucket {b} ", fontsize=7, ha="right", va="center")
    ax1.set_yticks([-0.125 * (nb - 1), 1],
                   ["reduce-scatter\n(launch → wait\nreturned)", "grad ready"])
    ax1.set_xlabel("ms since the last micro-batch's backward started (rank 0, gloo, CPU)")
    ax1.legend(fontsize=7, loc="upper right")
    ax1.set_ylim(-0.25 * nb - 0.2, 1.5)
    ax1.set_xlim(left=-0.05 * end)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
