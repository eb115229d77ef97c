"""Draws the tiling picture of the FlashAttention tutorial.

    uv run python benchmarks/flashattn_tiling_figure.py

Writes docs/tutorials/img/flashattn-tiling.{png,svg}: the (seqlen_q x seqlen_k) score matrix cut
into blocks, causal, with the blocks a program skips, masks or runs unmasked; left the forward
and dQ programs (one query block walks the key blocks), right the dK/dV programs (one key block
walks the query blocks).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle

OUT = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img"
NQ, NK = 6, 6  # blocks along queries (rows) and keys (columns), square causal
COLORS = {"skip": "#eeeeee", "mask": "#f6c667", "full": "#6fa8dc"}


def kind(i: int, j: int) -> str:
    if j > i:
        return "skip"  # entirely above the diagonal: never loaded
    if j == i:
        return "mask"  # the diagonal crosses it: element-wise mask
    return "full"  # entirely below: no mask at all


def panel(ax, title: str, highlight_row: int | None, highlight_col: int | None):
    for i in range(NQ):
        for j in range(NK):
            k = kind(i, j)
            lw = 1.0
            edge = "white"
            if (highlight_row == i or highlight_col == j) and k != "skip":
                edge, lw = "#c0392b", 2.5
            ax.add_patch(Rectangle((j, NQ - 1 - i), 1, 1, facecolor=COLORS[k], edgecolor=edge,
                                   linewidth=lw))
    ax.plot([0, NK], [NQ, 0], color="#555555", lw=1, ls="--")  # the causal diagonal
    if highlight_row is not None:
        y = NQ - 1 - highlight_row + 0.5
        ax.add_patch(FancyArrowPatch((0.1, y), (highlight_row + 0.9, y), arrowstyle="-|>",
                                     mutation_scale=14, color="#c0392b"))
        ax.text(-0.15, y, "Q block i", ha="right", va="center", fontsize=9)
    if highlight_col is not None:
        x = highlight_col + 0.5
        ax.add_patch(FancyArrowPatch((x, NQ - 1 - highlight_col + 0.9), (x, 0.1),
                                     arrowstyle="-|>", mutation_scale=14, color="#c0392b"))
        ax.text(x, NQ + 0.1, "K/V block j", ha="center", va="bottom", fontsize=9)
    ax.set_xlim(-1.6, NK + 0.2)
    ax.set_ylim(-0.6, NQ + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    ax.text(NK / 2, -0.4, "keys (seqlen_k) →", ha="center", va="center", fontsize=9)


def main():
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    panel(axes[0], "forward and dQ: one program per query block\nwalks the K/V blocks left to right",
          highlight_row=3, highlight_col=None)
    panel(axes[1], "dK/dV: one program per key block\nwalks the query blocks top to bottom",
          highlight_row=None, highlight_col=2)
    fig.legend(handles=[Patch(color=COLORS["full"], label="below the diagonal: no mask"),
                        Patch(color=COLORS["mask"], label="on the diagonal: masked"),
                        Patch(color=COLORS["skip"], label="above: skipped (never loaded)")],
               loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86, bottom=0.1, wspace=0.05)
    OUT.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        fig.savefig(OUT / f"flashattn-tiling.{ext}", dpi=110)
    print("wrote", OUT / "flashattn-tiling.png")


if __name__ == "__main__":
    main()
