"""Draw the fused-GEMM tutorial's pictures into docs/tutorials/img/ (matplotlib, SVG).

    python benchmarks/gemm_figures.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable SVGs
matplotlib.rcParams["svg.hashsalt"] = "haillm"  # stable ids: re-running gives the same file
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

IMG = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img"
COL = {"Q": "#4e79a7", "K": "#f28e2b", "V": "#59a14f", "mem": "#e15759", "reg": "#76b7b2"}


def box(ax, x, y, w, h, text, color, fs=9):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", lw=0.8, alpha=0.85))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs)


def arrow(ax, x0, y0, x1, y1):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="->", mutation_scale=10, lw=0.8))


def epilogue_figure(path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    ax = axes[0]
    ax.set_title("unfused: 4 kernels, 3 (M, N) round trips through memory", fontsize=10)
    box(ax, 0.0, 0.6, 1.6, 0.5, "GEMM x·Wg^T", "white")
    box(ax, 0.0, 0.0, 1.6, 0.5, "GEMM x·Wu^T", "white")
    box(ax, 2.1, 0.6, 0.9, 0.5, "g (HBM)", COL["mem"])
    box(ax, 2.1, 0.0, 0.9, 0.5, "u (HBM)", COL["mem"])
    box(ax, 3.5, 0.6, 0.9, 0.5, "silu", "white")
    box(ax, 4.8, 0.6, 1.0, 0.5, "silu(g)\n(HBM)", COL["mem"], fs=8)
    box(ax, 5.0, 0.0, 0.8, 0.5, "mul", "white")
    box(ax, 6.2, 0.0, 0.8, 0.5, "h", COL["reg"])
    for a in [(1.6, 0.85, 2.1, 0.85), (1.6, 0.25, 2.1, 0.25), (3.0, 0.85, 3.5, 0.85),
              (4.4, 0.85, 4.8, 0.85), (5.3, 0.6, 5.4, 0.5), (3.0, 0.25, 5.0, 0.25),
              (5.8, 0.25, 6.2, 0.25)]:
        arrow(ax, *a)
    ax.set_xlim(-0.1, 7.1)
    ax.set_ylim(-0.2, 1.3)
    ax.axis("off")
    ax = axes[1]
    ax.set_title("fused: 1 kernel, accumulators stay in registers", fontsize=10)
    box(ax, 0.0, 0.3, 1.2, 0.5, "x tile", "white")
    box(ax, 1.6, 0.75, 1.4, 0.45, "acc_g +=\nx·Wg^T", COL["reg"], fs=8)
    box(ax, 1.6, -0.1, 1.4, 0.45, "acc_u +=\nx·Wu^T", COL["reg"], fs=8)
    box(ax, 3.5, 0.3, 1.7, 0.5, "epilogue:\nsilu(acc_g)·acc_u", COL["reg"], fs=8)
    box(ax, 5.7, 0.3, 0.8, 0.5, "h", COL["reg"])
    for a in [(1.2, 0.55, 1.6, 0.95), (1.2, 0.55, 1.6, 0.15), (3.0, 0.95, 3.5, 0.6),
              (3.0, 0.15, 3.5, 0.5), (5.2, 0.55, 5.7, 0.55)]:
        arrow(ax, *a)
    ax.text(2.3, 1.28, "loop over K", ha="center", fontsize=8, style="italic")
    ax.set_xlim(-0.1, 6.6)
    ax.set_ylim(-0.2, 1.4)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tp_figure(path: Path) -> None:
    widths = {"Q": 8, "K": 2, "V": 2}  # GQA: n_heads = 4 x n_kv_heads
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    titles = ["merged weight cat([Wq, Wk, Wv])", "wrong: contiguous halves",
              "right: half of every part per rank"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-0.5, 4.5)
        ax.set_ylim(-0.5, 12.5)
        ax.invert_yaxis()
        ax.axis("off")
    y = 0
    for name, w in widths.items():
        box(axes[0], 0.5, y, 3, w, name, COL[name])
        y += w
    # wrong: rows [0, 6) on rank 0, [6, 12) on rank 1
    y = 0
    for name, w in widths.items():
        for _ in range(w):
            rank = 0 if y < 6 else 1
            axes[1].add_patch(Rectangle((0.5 + 1.6 * rank, y), 1.4, 1, facecolor=COL[name],
                                        edgecolor="white", alpha=0.85))
            y += 1
    axes[1].text(1.2, 12.4, "rank 0", ha="center", fontsize=9)
    axes[1].text(2.8, 12.4, "rank 1", ha="center", fontsize=9)
    # right: each rank gets chunk(2)[r] of each part, re-concatenated
    for rank in range(2):
        y = 0
        for name, w in widths.items():
            box(axes[2], 0.5 + 1.6 * rank, y, 1.4, w / 2, f"{name}{rank}", COL[name], fs=8)
            y += w / 2
        axes[2].text(1.2 + 1.6 * rank, 6.6, f"rank {rank}", ha="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    IMG.mkdir(parents=True, exist_ok=True)
    epilogue_figure(IMG / "gemm-epilogue.svg")
    tp_figure(IMG / "gemm-tp-slicing.svg")
    print("wrote", IMG / "gemm-epilogue.svg", IMG / "gemm-tp-slicing.svg")
