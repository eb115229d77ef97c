"""Train the same model in several (dp, tp, pp) layouts on CPU/gloo: speed, MFU, loss curves.

    OMP_NUM_THREADS=1 uv run python benchmarks/trainer_layouts.py [--steps 50] [--precision fp32]

Every layout trains the same seeded model on the same global batches (the sampler hands the
same windows to every layout), so their loss curves must lie on top of each other (fp32: to
rounding; bf16 drifts where the micro-batch size differs). Writes:

* `docs/benchmarks/trainer.md`: tokens/s, MFU, communication share, per layout;
* `docs/tutorials/img/trainer-loss-curves.png`: the loss curves of all layouts, overlaid;
* `docs/tutorials/img/trainer-rank-grid.png`: the rank grid of dp=2, tp=2, pp=2.

The ranks are forked (`run_distributed(..., start_method="fork")`), so a layout starts in
seconds rather than re-importing torch in every rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from harness import device_name, write_table  # noqa: E402

from haillm.parallel.testing import run_distributed  # noqa: E402
from haillm.trainer import Config, load_config, train  # noqa: E402
from haillm.trainer.config import apply_dict  # noqa: E402
from haillm.trainer.data import build_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "tutorials" / "img"
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)]


def _rank(cfg_dict: dict):
    torch.set_num_threads(1)
    train(apply_dict(Config(), cfg_dict, source="benchmark"))


def run_layout(base: Config, dp: int, tp: int, pp: int, out: Path) -> list[dict]:
    d = base.to_dict()
    d["parallel"].update(dp=dp, tp=tp, pp=pp)
    d["run"]["out"] = str(out)
    world = dp * tp * pp
    if world == 1:
        _rank(d)
    else:
        run_distributed(_rank, world, d, timeout=1800, start_method="fork")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def draw_grid(path: Path, dp=2, tp=2, pp=2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    colors = ["#4C72B0", "#DD8452"]
    for s in range(pp):
        x0 = s * (tp * 1.2 + 0.8)
        ax.add_patch(plt.Rectangle((x0 - 0.15, -0.35), tp * 1.2 + 0.1, dp * 1.2 + 0.3,
                                   fill=False, ls="--", lw=1, ec="gray"))
        ax.text(x0 + tp * 0.6 - 0.2, dp * 1.2 + 0.1,
                f"stage {s}: " + ("embedding + layers" if s == 0 else "layers + norm/head/loss"),
                ha="center", fontsize=9)
        for d in range(dp):
            for t in range(tp):
                r = s * dp * tp + d * tp + t
                ax.add_patch(plt.Rectangle((x0 + t * 1.2, d * 1.2), 1.0, 1.0, color=colors[d],
                                           alpha=0.85))
                ax.text(x0 + t * 1.2 + 0.5, d * 1.2 + 0.5, f"rank {r}\n(dp{d},tp{t},pp{s})",
                        ha="center", va="center", fontsize=8, color="white")
    ax.annotate("", xy=(tp * 1.2 + 0.75, 0.5), xytext=(tp * 1.2 - 0.2, 0.5),
                arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.text(tp * 1.2 + 0.27, 0.05, "P2P\nactivations", ha="center", fontsize=7)
    ax.set_xlim(-0.4, pp * (tp * 1.2 + 0.8))
    ax.set_ylim(-0.5, dp * 1.2 + 0.5)
    ax.axis("off")
    ax.set_title("rank = pp*(dp*tp) + dp*tp_size + tp  —  TP neighbours adjacent (Megatron order)"
                 "\nrows: DP replicas (ZeRO-1 shards over a column); pairs: TP+SP; boxes: stages",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    base = load_config(args.preset, overrides=[
        f"train.steps={args.steps}", f"train.precision={args.precision}", "train.eval_every=0",
        "run.sample_tokens=0", "run.tensorboard=false", "parallel.microbatches=4",
        f"train.warmup_steps={max(args.steps // 5, 1)}"])
    tmp = Path(tempfile.mkdtemp(prefix="haillm-bench-"))
    base.run.out = str(tmp / "data")
    # the tokenizer is named before the build (it is trained and saved there), so that the
    # cache's fingerprint (which covers a named tokenizer) is the one every layout computes
    base.data.tokenizer = str(tmp / "data" / "tokenizer.json")
    build_dataset(base.data, base.model.vocab_size, base.model.seq_len, tmp / "data")
    curves, rows = {}, []
    for dp, tp, pp in LAYOUTS:
        out = tmp / f"{dp}{tp}{pp}"
        (out).mkdir(parents=True)
        for f in ("tokens.bin", "tokens.json", "tokenizer.json"):  # reuse the tokenised corpus
            (out / f).write_bytes((tmp / "data" / f).read_bytes())
        recs = run_layout(base, dp, tp, pp, out)
        curves[(dp, tp, pp)] = [r["loss"] for r in recs]
        steady = recs[len(recs) // 4:]  # skip the warm-up steps
        med = lambda k, steady=steady: statistics.median(r[k] for r in steady)
        rows.append([f"({dp}, {tp}, {pp})", dp * tp * pp, f"{med('tokens_per_s'):,.0f}",
                     f"{100 * med('mfu'):.2f} %", f"{1000 * med('step_time_s'):.0f}",
                     f"{100 * med('comm_fraction'):.0f} %", f"{recs[0]['loss']:.3f}",
                     f"{recs[-1]['loss']:.3f}"])
        print(rows[-1], flush=True)
    m = base.model
    notes = (f"Preset `{args.preset}` ({m.n_params() / 1e6:.2f}M parameters, seq {m.seq_len}, "
             f"global batch {base.train.global_batch} sequences, 4 micro-batches, "
             f"{args.precision}), {args.steps} steps, medians over the last 3/4 of the steps. "
             f"Machine: {device_name()}, all ranks on the same cores (gloo over loopback), "
             "shared with other jobs while measured: read the ratios, not the absolute numbers. "
             "MFU counts 6N + 12·L·d·S FLOPs per token against the measured fp32 matmul peak of "
             "the cores in use (one thread per rank, at most the machine's cores). Every rank "
             "runs one thread, so a 1-rank layout uses one core and the 2- and 8-rank layouts "
             "both cores: DP's gain here is the second core. 'communication' is rank 0's time "
             "in pipeline P2P waits (which include the pipeline bubble) and DP/ZeRO "
             "collectives; TP's collectives run inside the layers and count as compute. On one "
             "CPU, TP and PP only add messages: they exist to fit models that one device "
             "cannot hold, and here they prove that they compute the same thing (the last "
             "losses agree).")
    print(write_table("trainer.md", "Tokens/s and MFU per layout (CPU, gloo)",
                      ["layout (dp, tp, pp)", "ranks", "tokens/s", "MFU", "step ms",
                       "communication", "first loss", "last loss"], rows, notes))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-.", (0, (1, 3))]
    for (lay, c), ls in zip(curves.items(), styles):
        ax.plot(range(1, len(c) + 1), c, ls=ls, lw=1.6, label=f"dp={lay[0]} tp={lay[1]} pp={lay[2]}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{args.preset} preset, {args.precision}: the same run in five layouts")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(IMG / "trainer-loss-curves.png", dpi=110)
    plt.close(fig)
    draw_grid(IMG / "trainer-rank-grid.png")


if __name__ == "__main__":
    main()
