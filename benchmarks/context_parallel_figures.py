"""Draw the context-parallel tutorial's picture: which (query chunk, key chunk) blocks of a causal
attention each rank computes, contiguous layout vs zigzag, and the work per rank.

    uv run python benchmarks/context_parallel_figures.py   # → docs/tutorials/img/cp-zigzag.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Polygon, Rectangle

OUT = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img" / "cp-zigzag.png"
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
CP = 4
N = 2 * CP  # the sequence in 2*cp chunks


def owner(chunk: int, zigzag: bool) -> int:
    """Rank holding sequence chunk `chunk` (of 2*cp): zigzag r -> {r, 2cp-1-r}; else contiguous."""
    if zigzag:
        return chunk if chunk < CP else N - 1 - chunk
    return chunk // 2


def panel(ax, zigzag: bool) -> list[float]:
    work = [0.0] * CP
    for i in range(N):  # query chunk (row)
        r = owner(i, zigzag)
        for j in range(N):  # key chunk (column)
            y = N - 1 - i
            if j > i:  # fully masked: never computed
                ax.add_patch(Rectangle((j, y), 1, 1, fc="white", ec="#DDDDDD", lw=0.5))
                continue
            if j == i:  # the diagonal: half the block
                ax.add_patch(Rectangle((j, y), 1, 1, fc="white", ec="#DDDDDD", lw=0.5))
                ax.add_patch(Polygon([(j, y), (j, y + 1), (j + 1, y)], closed=True,
                                     fc=COLORS[r], ec="black", lw=0.4))
                work[r] += 0.5
            else:
                ax.add_patch(Rectangle((j, y), 1, 1, fc=COLORS[r], ec="black", lw=0.4))
                work[r] += 1.0
    ax.set_xlim(0, N)
    ax.set_ylim(0, N)
    ax.set_aspect("equal")
    ax.set_xticks([c + 0.5 for c in range(N)], [str(c) for c in range(N)], fontsize=7)
    ax.set_yticks([N - 1 - c + 0.5 for c in range(N)],
                  [f"{c} (r{owner(c, zigzag)})" for c in range(N)], fontsize=7)
    ax.set_xlabel("key chunk", fontsize=8)
    ax.set_ylabel("query chunk (its rank)", fontsize=8)
    title = "zigzag: rank r holds chunks r, 2cp-1-r" if zigzag else "contiguous: rank r holds 1/cp"
    ax.set_title(title, fontsize=9)
    return work


def main() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), gridspec_kw=dict(width_ratios=[1, 1, 0.8]))
    w_contig = panel(axes[0], zigzag=False)
    w_zig = panel(axes[1], zigzag=True)
    ax = axes[2]
    xs = range(CP)
    ax.bar([x - 0.2 for x in xs], w_contig, 0.4, color="#BBBBBB", ec="black", label="contiguous")
    ax.bar([x + 0.2 for x in xs], w_zig, 0.4, color=COLORS, ec="black", label="zigzag")
    ax.set_xticks(list(xs), [f"rank {r}" for r in xs], fontsize=8)
    ax.set_ylabel("score blocks computed (chunk²)", fontsize=8)
    ax.set_title(f"causal work per rank, cp = {CP}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Causal attention over 2·cp chunks: the blocks each rank computes "
                 "(white: fully masked, skipped)", fontsize=10)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=130)
    print(f"wrote {OUT}; work contiguous {w_contig}, zigzag {w_zig}")


if __name__ == "__main__":
    main()
