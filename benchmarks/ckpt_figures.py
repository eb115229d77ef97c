"""Figures of the checkpoints tutorial: per-rank memory of the paper's shapes (haillm-plan) and
the crash-safe save protocol. Run: `uv run python benchmarks/ckpt_figures.py`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from haillm.trainer.plan import plan, plan_config  # noqa: E402

IMG = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "img"

CASES = [
    ("7B\ndp=8", "deepseek-7b", dict(dp=8, microbatches=4)),
    ("7B\ndp=8 tp=2", "deepseek-7b", dict(dp=8, tp=2, microbatches=4)),
    ("7B\ndp=4 tp=2 pp=2", "deepseek-7b", dict(dp=4, tp=2, pp=2, microbatches=8)),
    ("67B\ndp=8 tp=8 pp=4", "deepseek-67b", dict(dp=8, tp=8, pp=4, microbatches=16)),
    ("67B\n(no SP)", "deepseek-67b", dict(dp=8, tp=8, pp=4, microbatches=16,
                                           sequence_parallel=False)),
    ("67B\ndp=16 tp=8 pp=8", "deepseek-67b", dict(dp=16, tp=8, pp=8, microbatches=32)),
]


def memory_figure() -> None:
    parts = ["params", "grads", "optimizer", "activations"]
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for x, (_label, preset, lay) in enumerate(CASES):
        p = plan(plan_config(preset, **lay))[0]  # stage 0: the most in-flight micro-batches
        bottom = 0.0
        for part, c in zip(parts, colors):
            v = getattr(p, part) / 2**30
            ax.bar(x, v, bottom=bottom, color=c, label=part if x == 0 else None)
            bottom += v
        ax.text(x, bottom + 1, f"{bottom:.0f}", ha="center", fontsize=9)
    ax.axhline(141e9 / 2**30, color="gray", ls="--", lw=1)
    ax.text(len(CASES) - 0.5, 133, "H200: 141 GB = 131 GiB", ha="right", fontsize=8, color="gray")
    ax.set_xticks(range(len(CASES)), [c[0] for c in CASES], fontsize=8)
    ax.set_ylabel("GiB per rank (pipeline stage 0)")
    ax.set_title("haillm-plan: bf16, ZeRO-1, 1F1B, seq 4096, micro-batch 1, flash attention")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(IMG / "ckpt-plan-memory.png", dpi=110)


def protocol_figure() -> None:
    fig, ax = plt.subplots(figsize=(10, 2.4))
    ax.axis("off")
    steps = ["every rank: DCP writes\n.tmp-step_N/*.distcp\n(+ rng, trainer_state)",
             "barrier", "rank 0: fsync,\nSHA-256 of every file", "rank 0: manifest.json\n(last)",
             "rename .tmp-step_N\n-> step_N (atomic)", "delete all but\nthe last k"]
    for i, s in enumerate(steps):
        ax.add_patch(plt.Rectangle((i * 1.7, 0.3), 1.55, 1.0, fc="#E8EEF7", ec="#4C72B0"))
        ax.text(i * 1.7 + 0.775, 0.8, s, ha="center", va="center", fontsize=7)
        if i:
            ax.annotate("", (i * 1.7, 0.8), (i * 1.7 - 0.15, 0.8),
                        arrowprops=dict(arrowstyle="->"))
    ax.text(0, 0.05, "a crash anywhere before the rename leaves only .tmp-step_N: never read, "
            "removed by the next save; older step_* folders are untouched", fontsize=8)
    ax.set_xlim(-0.1, 10.2)
    ax.set_ylim(0, 1.4)
    fig.tight_layout()
    fig.savefig(IMG / "ckpt-save-protocol.png", dpi=110)


if __name__ == "__main__":
    IMG.mkdir(parents=True, exist_ok=True)
    memory_figure()
    protocol_figure()
    print("wrote", IMG / "ckpt-plan-memory.png", IMG / "ckpt-save-protocol.png")
