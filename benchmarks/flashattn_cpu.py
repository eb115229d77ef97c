"""CPU benchmarks of haillm.flashattn: peak memory of reference vs tiled (forward+backward) and
speed of tiled vs torch SDPA.

    OMP_NUM_THREADS=1 nice -n 10 uv run python benchmarks/flashattn_cpu.py [--max-seqlen 16384]

Memory: each configuration runs in a fresh process (`peak_memory_subprocess`): the peak resident
set growth of one forward+backward, inputs excluded. batch 1, 1 head, headdim 64, fp32. The
reference is skipped where its score-sized tensors would exceed `--ref-max-gb` (the machine is
shared); the table says so. Writes tables into docs/benchmarks/flashattn.md and the plot
docs/benchmarks/img/flashattn-memory.{png,svg}.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
import torch.nn.functional as F
from harness import DOCS, device_name, peak_memory_subprocess, time_fn, write_table

from haillm.flashattn import attention_reference, flash_attention

PAGE = "flashattn.md"
B, H, D = 1, 1, 64
# the reference peaks at about this many (S x S) fp32 tensors (measured: ~10.5 at 2k; scores,
# masked copies, probs and their gradients): used only to decide when to skip it
REF_SQUARES = 11


def setup(s: int):
    torch.manual_seed(0)
    # Warm up both paths on a tiny input first: one-off allocations (autograd engine, BLAS
    # buffers) then sit below the high-water mark that the measurement starts from.
    w = [torch.randn(B, 64, H, D, requires_grad=True) for _ in range(3)]
    run_reference((*w, torch.randn(B, 64, H, D)))
    run_tiled((*w, torch.randn(B, 64, H, D)))
    q, k, v = (torch.randn(B, s, H, D, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(B, s, H, D)


def run_reference(state):
    q, k, v, do = state
    attention_reference(q, k, v, causal=True).backward(do)


def run_tiled(state):
    q, k, v, do = state
    flash_attention(q, k, v, causal=True, impl="tiled").backward(do)


def run_sdpa(state):
    q, k, v, do = state
    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)


def memory_table(seqlens, ref_max_gb: float):
    rows, pts = [], []
    for s in seqlens:
        tiled = peak_memory_subprocess(setup, run_tiled, s)
        est = REF_SQUARES * B * H * s * s * 4
        if est <= ref_max_gb * 2**30:
            ref = peak_memory_subprocess(setup, run_reference, s)
            floor = 2**20 // 10  # below ~0.1 MiB the RSS reading is noise: report a bound
            ratio_cell = (f"{ref / tiled:.0f}x" if tiled >= floor else f"> {ref / floor:.0f}x")
            ref_cell = f"{ref / 2**20:,.0f}"
        else:
            ref, ref_cell, ratio_cell = None, f"skipped (~{est / 2**30:.0f} GB est.)", "n/a"
        io = 4 * B * s * H * D * 4  # q, k, v, O in fp32: what any implementation must hold
        rows.append([s, ref_cell, f"{tiled / 2**20:,.2f}", ratio_cell, f"{io / 2**20:.1f}",
                     f"{B * H * s * s * 4 / 2**20:,.0f}"])
        pts.append((s, ref, tiled))
        print(rows[-1], flush=True)
    notes = (
        f"Peak resident-set growth of one causal forward+backward in a fresh process "
        f"(`peak_memory_subprocess`), batch {B}, {H} head, headdim {D}, fp32, on "
        f"{device_name()}. `S² tensor` is the size of one fp32 score matrix, which the "
        "reference materialises several times (scores, probabilities, their gradients); the "
        "tiled path holds only blocks of it (128 x 128) and saves q, k, v, O and the logsumexp. "
        f"The reference is skipped where ~{REF_SQUARES} S² tensors would exceed "
        f"{ref_max_gb:g} GB (a shared machine). Script: `benchmarks/flashattn_cpu.py`."
    )
    write_table(PAGE, "CPU: peak memory, reference vs tiled (forward+backward)",
                ["seqlen", "reference MiB", "tiled MiB", "ratio", "q,k,v,O MiB", "S² tensor MiB"],
                rows, notes)
    return pts


def plot(pts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    s_all = [p[0] for p in pts]
    ax.plot(s_all, [p[2] / 2**20 for p in pts], "o-", label="tiled (FlashAttention)")
    ref = [(p[0], p[1] / 2**20) for p in pts if p[1] is not None]
    if ref:
        ax.plot(*zip(*ref), "s-", label="reference (materialises S x S)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak memory, forward+backward (MiB)")
    ax.set_title(f"Attention memory on CPU (batch {B}, {H} head, d={D}, fp32, causal)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = DOCS / "img"
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        fig.savefig(out / f"flashattn-memory.{ext}", dpi=120)
    print("wrote", out / "flashattn-memory.png")


def speed_table(seqlens):
    rows = []
    for s in seqlens:
        state = setup(s)
        # SDPA's native layout is (B, H, S, D)
        sdpa_state = tuple(t.detach().transpose(1, 2).contiguous().requires_grad_(i < 3)
                           for i, t in enumerate(state))
        tiled = functools.partial(run_tiled, state)
        sdpa = functools.partial(run_sdpa, sdpa_state)
        ref = functools.partial(run_reference, state)
        t_t, t_s, t_r = (time_fn(f, device="cpu", warmup=1, min_run_time=0.3)
                         for f in (tiled, sdpa, ref))
        flops = 3.5 * 4 * B * H * s * s * D / 2  # fwd + bwd, causal
        rows.append([s, f"{t_r:.1f}", f"{t_s:.1f}", f"{t_t:.1f}", f"{t_t / t_s:.2f}x",
                     f"{flops / (t_t * 1e-3) / 1e9:.1f}", f"{flops / (t_s * 1e-3) / 1e9:.1f}"])
        print(rows[-1], flush=True)
    notes = (
        f"Median wall time of one causal forward+backward, batch {B}, {H} head, headdim {D}, "
        f"fp32, {torch.get_num_threads()} thread(s), on {device_name()} (shared machine: treat "
        "as indicative). SDPA = `torch.nn.functional.scaled_dot_product_attention` (its CPU "
        "flash kernel). GFLOP/s with FLOPs = 3.5 · 4·b·h·s²·d / 2 (causal). The tiled path is the "
        "teaching version in Python loops; on CPU it buys memory, not speed."
    )
    write_table(PAGE, "CPU: speed, tiled vs torch SDPA (forward+backward)",
                ["seqlen", "reference ms", "SDPA ms", "tiled ms", "tiled / SDPA",
                 "tiled GFLOP/s", "SDPA GFLOP/s"], rows, notes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-seqlen", type=int, default=16384)
    ap.add_argument("--ref-max-gb", type=float, default=6.0)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    seqlens = [s for s in (512, 1024, 2048, 4096, 8192, 16384) if s <= args.max_seqlen]
    if not args.skip_memory:
        plot(memory_table(seqlens, args.ref_max_gb))
    if not args.skip_speed:
        speed_table([s for s in seqlens if s <= 2048])


if __name__ == "__main__":
    main()
