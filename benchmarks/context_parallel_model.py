"""Context parallelism in the model on CPU (gloo): per-rank activation memory vs cp, measured
next to `haillm-plan`.

A one-layer `DeepSeekLM` with the tiny preset's widths (hidden 128, 4 query heads and 2 K/V
heads of dim 32, SwiGLU 344, vocabulary 4096), fp32, batch 1, tiled (flash) attention, goes
through `parallelize` at cp = 1, 2, 4 (ring attention, zigzag layout, one gloo rank per CP
rank) and runs one forward + backward at seqlen 2k-16k. Every rank measures:

* **saved for backward**: the bytes of every distinct storage that autograd keeps during the
  forward (`tests/trainer/memory.py`'s `saved_tensors_hooks`, parameters excluded): what the
  planner's activation line counts, (B, S/cp) tokens' worth per rank;
* **peak RSS growth**: the resident set's high-water mark (Linux VmHWM, reset after setup and
  a warm-up step, so the parameters' .grad exist already) during the step, above the RSS
  before it; on top of the saved tensors still alive it holds the backward's transients (the
  activations' gradients, the ring's K/V and dK/dV buffers, the block attention's tiles);

next to the plan: `activation_bytes(cfg, 1, first=True, last=True)` and `ring_workspace(cfg)`
(the ring's two K/V shards and two fp32 dK/dV accumulators during one attention's backward).

    OMP_NUM_THREADS=1 uv run python benchmarks/context_parallel_model.py [--quick]
    # → docs/benchmarks/context-parallel.md, section "Model activations vs cp"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.trainer.memory

import torch
from harness import _reset_peak_rss, _status_kib, device_name, write_table

from haillm.parallel import ParallelDims, split_sequence
from haillm.parallel.testing import run_distributed
from haillm.trainer import DeepSeekLM, load_config
from haillm.trainer.parallelize import parallelize
from haillm.trainer.plan import activation_bytes, ring_workspace
from tests.trainer.memory import saved_bytes

PAGE = "context-parallel.md"
TITLE = "Model activations vs cp: measured and haillm-plan (CPU, gloo)"


def model_config(seqlen: int, cp: int, n_layers: int = 1):
    """The benchmark's `Config`: tiny widths, `n_layers` blocks, fp32, one sequence."""
    return load_config("tiny", overrides=[
        f"model.n_layers={n_layers}", f"model.seq_len={seqlen}", "parallel.attention=tiled",
        "parallel.fused_swiglu=false", "train.precision=fp32", f"parallel.cp={cp}",
        "parallel.microbatches=1", "train.global_batch=1"])


def _rank_main(seqlen: int, cp: int, n_layers: int):
    torch.set_num_threads(1)
    cfg = model_config(seqlen, cp, n_layers)
    m = cfg.model
    dims = ParallelDims(cp=cp).build()
    chunk = parallelize(DeepSeekLM(m, seed=0, lazy=True), dims, cfg, data_parallel=False)[0]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.vocab_size, (1, seqlen), generator=g)
    x = split_sequence(tokens, dim=1, group=dims.cp_group)  # (1, S/cp): this rank's chunks
    # warm-up on a short sequence: imports, the allocator, the parameters' .grad
    w = split_sequence(tokens[:, :128 * cp], dim=1, group=dims.cp_group)
    chunk(w, w).backward()
    rss = _reset_peak_rss()
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    saved, loss = saved_bytes(chunk, x, x)  # what autograd keeps (tests/trainer/memory.py)
    loss.backward()
    secs = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - before) * 1024 if rss else None
    return dict(saved=saved, peak=peak, secs=secs)


def table_notes(n_layers: int, total_s: float) -> str:
    """The table's notes: the setup and what each column measures."""
    m = model_config(2048, 1, n_layers).model
    return (
        f"One forward + backward of a {n_layers}-layer `DeepSeekLM` (tiny widths: hidden "
        f"{m.hidden_size}, {m.n_heads} query / {m.n_kv_heads} K/V heads of dim {m.head_dim}, "
        f"SwiGLU {m.intermediate_size}, vocabulary {m.vocab_size}), fp32, batch 1, tiled "
        f"attention; cp ranks of one sequence (zigzag), one gloo process and intra-op thread "
        f"each, {device_name()}; `benchmarks/context_parallel_model.py` (total "
        f"{total_s:.0f} s). *Saved*: the bytes autograd keeps for "
        "backward on a rank (saved-tensor hooks, parameters excluded; the max over ranks); "
        "*plan*: `haillm-plan`'s activations per micro-batch (`activation_bytes`, every "
        "per-token term at s/cp). *Ring workspace*: the plan's transient ring buffers during "
        "one attention's backward (two K/V shards, two fp32 dK/dV accumulators; not saved "
        "tensors, so not in the saved column). *Peak RSS growth*: the resident set's "
        "high-water mark during the step above the RSS before it (glibc's mmap threshold fixed "
        "at 128 KiB). Backward frees each node's saved tensors as it runs (the head's "
        "log-probabilities before the blocks' gradients exist), so the peak is the saved bytes "
        "plus a few MiB in flight (activation gradients, the block attention's tiles, gloo's "
        "buffers); the ring workspace comes in the attention's backward, after the head and the "
        "MLP have freed theirs, so plan + ring bounds the saved part from above. With 512 tokens "
        "per rank (2k over 4) the fixed MiB weigh most. The step time is a shared 2-core "
        "machine's (cp = 4 oversubscribes it)."
    )


def main():
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # as benchmarks/context_parallel.py: a fixed mmap threshold returns every large freed
        # tensor's pages, so the resident set's high-water mark is the peak of live tensors
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="seqlen 512, 1024 (a smoke test)")
    ap.add_argument("--layers", type=int, default=1)
    args = ap.parse_args()
    seqlens = (512, 1024) if args.quick else (2048, 4096, 8192, 16384)
    mib = 2.0**20
    rows = []
    t_all = time.perf_counter()
    for seqlen in seqlens:
        for cp in (1, 2, 4):
            res = run_distributed(_rank_main, cp, seqlen, cp, args.layers, start_method="fork",
                                  timeout=1800)
            cfg = model_config(seqlen, cp, args.layers)
            act = activation_bytes(cfg, args.layers, first=True, last=True)
            ring = ring_workspace(cfg)
            saved = max(r["saved"] for r in res)
            peak = max(r["peak"] for r in res) if all(r["peak"] is not None for r in res) \
                else None
            rows.append([seqlen, cp, f"{saved / mib:.1f}", f"{act / mib:.1f}",
                         f"{act / saved:.3f}", f"{ring / mib:.2f}",
                         "n/a" if peak is None else f"{peak / mib:.1f}",
                         "n/a" if peak is None else f"{peak / (act + ring):.2f}",
                         f"{statistics.median(r['secs'] for r in res):.1f}"])
            print(rows[-1], flush=True)
    notes = table_notes(args.layers, time.perf_counter() - t_all)
    table = write_table(
        PAGE, TITLE,
        ["seqlen", "cp", "saved for bwd MiB (measured, max rank)", "plan activations MiB",
         "plan / measured", "plan ring workspace MiB", "peak RSS growth MiB (max rank)",
         "peak / (plan + ring)", "step s"], rows, notes=notes)
    print(table)


if __name__ == "__main__":
    main()
