"""Draw docs/tutorials/img/fusedops-bytes.svg: bytes moved per element, eager vs fused.

    uv run python benchmarks/fusedops_figures.py

The counts are the ones derived in docs/tutorials/fused-ops.md (each eager PyTorch op reads
its inputs from memory and writes its output back; bf16 activations, fp32 optimizer state).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img" / "fusedops-bytes.svg"

# (operation, eager bytes / element, fused bytes / element)
ROWS = [
    ("RMSNorm + residual add\n(bf16, forward)", 42, 8),
    ("AdamW step\n(fp32 param, grad, m, v)", 80, 28),
    ("cross-entropy fwd + bwd\n(bf16 logits)", 44, 10),
]


def main():
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    names = [r[0] for r in ROWS]
    y = range(len(ROWS))
    ax.barh([i + 0.2 for i in y], [r[1] for r in ROWS], height=0.38, color="#c44e52",
            label="eager PyTorch (one kernel per op)")
    ax.barh([i - 0.2 for i in y], [r[2] for r in ROWS], height=0.38, color="#4c72b0",
            label="fused kernel (haillm.fusedops)")
    for i, r in enumerate(ROWS):
        ax.text(r[1] + 1, i + 0.2, f"{r[1]} B", va="center", fontsize=9)
        ax.text(r[2] + 1, i - 0.2, f"{r[2]} B  ({r[1] / r[2]:.1f}x less)", va="center",
                fontsize=9)
    ax.set_yticks(list(y), names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("bytes moved through HBM per element")
    ax.set_xlim(0, 100)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, metadata={"Date": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
