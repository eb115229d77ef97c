"""Draw the tutorial's diagram of Megatron's f and g around a tensor-parallel MLP (and its SP form).

    uv run python benchmarks/parallel_figures.py   # → docs/tutorials/img/parallel-fg.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img" / "parallel-fg.png"

BLUE, ORANGE, GREY, GREEN = "#4C72B0", "#DD8452", "#8C8C8C", "#55A868"


def box(ax, x, y, text, color, w=1.5, h=0.6, fs=9):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                fc=color, ec="black", lw=0.8, alpha=0.9))
    ax.text(x, y, text, ha="center", va="center", fontsize=fs, color="white", weight="bold")


def arrow(ax, x0, y0, x1, y1):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10,
                                 lw=0.9, color="black"))


def mlp(ax, title, f_text, g_text, f_sub, g_sub, x_text, z_text):
    ax.set_xlim(0, 13)
    ax.set_ylim(-0.2, 3.4)
    ax.axis("off")
    ax.set_title(title, fontsize=10, loc="left")
    box(ax, 0.8, 1.5, x_text, GREY, w=1.2)
    box(ax, 2.6, 1.5, f_text, ORANGE, w=1.0)
    ax.text(2.6, 0.75, f_sub, ha="center", va="top", fontsize=7.5)
    for i, y in enumerate((2.6, 0.4)):
        box(ax, 4.9, y, f"X·A{i}  (col {i})", BLUE, w=1.9)
        box(ax, 7.0, y, "GeLU", GREEN, w=1.1)
        box(ax, 9.0, y, f"Y{i}·B{i}  (row {i})", BLUE, w=1.9)
        arrow(ax, 3.1, 1.5, 3.95, y)
        arrow(ax, 5.85, y, 6.45, y)
        arrow(ax, 7.55, y, 8.05, y)
        arrow(ax, 9.95, y, 10.6, 1.5)
        ax.text(3.2, y + 0.35 if i == 0 else y - 0.45, f"rank {i}", fontsize=7.5, color=GREY)
    box(ax, 11.1, 1.5, g_text, ORANGE, w=1.0)
    ax.text(11.1, 0.75, g_sub, ha="center", va="top", fontsize=7.5)
    box(ax, 12.45, 1.5, z_text, GREY, w=0.9)
    arrow(ax, 1.4, 1.5, 2.1, 1.5)
    arrow(ax, 11.6, 1.5, 12.0, 1.5)


def main() -> None:
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.6))
    mlp(axes[0], "Tensor parallel (Megatron-LM): the MLP Z = GeLU(X·A)·B on 2 ranks",
        "f", "g", "fwd: identity\nbwd: all-reduce", "fwd: all-reduce\nbwd: identity", "X", "Z")
    mlp(axes[1], "Tensor + sequence parallel (Korthikanti et al.): f, g split into halves",
        "f̄", "ḡ", "fwd: all-gather (seq)\nbwd: reduce-scatter", "fwd: reduce-scatter\nbwd: all-gather",
        "X[s/t]", "Z[s/t]")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(OUT)


if __name__ == "__main__":
    main()
