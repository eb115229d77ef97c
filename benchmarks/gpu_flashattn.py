"""GPU check of haillm.flashattn: the GPU-marked tests, then TFLOP/s of the Triton kernels
against torch.nn.functional.scaled_dot_product_attention (flash backend), bf16.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :) python benchmarks/gpu_flashattn.py [--quick]

Shapes follow the FlashAttention-2 paper: batch * seqlen = 16k tokens, hidden 2048
(nheads = 2048 / headdim), seqlen 512 .. 16k, head dims 64 and 128, causal and not.
FLOPs = 4·b·h·s²·d for the forward (halved when causal), 2.5x that for the backward.
Writes the tables into docs/benchmarks/flashattn.md and prints them last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HAILLM_FLASHATTN_AUTOTUNE", "1")  # before haillm.flashattn is imported

sys.path.insert(0, str(Path(__file__).parent))
import torch
import torch.nn.functional as F
from harness import ROOT, device_name, write_table

from haillm.flashattn import flash_attention

PAGE = "flashattn.md"


def run_tests(timeout: float) -> str:
    env = dict(os.environ)
    env.pop("HAILLM_FLASHATTN_AUTOTUNE", None)  # tests use the fixed configs (fewer compiles)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/flashattn", "-p",
           "no:cacheprovider", "-o", "addopts=", "-W", "ignore::pytest.PytestConfigWarning"]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = (r.stdout + r.stderr).strip().splitlines()
        summary = out[-1] if out else "(no output)"
        print("\n".join(out[-40:]), flush=True)
    except subprocess.TimeoutExpired:
        summary = f"timed out after {timeout:.0f}s"
    return f"{summary} ({time.time() - t0:.0f}s)"


def sdpa(q, k, v, causal):
    # SDPA wants (B, H, S, D): a transposed view of our (B, S, H, D), which the flash
    # backend accepts as is (last dim contiguous), so neither side pays for a copy.
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal)
    return o.transpose(1, 2)


def flash_ctx():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION), "flash"
    except Exception:  # noqa: BLE001  (older torch)
        import contextlib

        return contextlib.nullcontext(), "default"


def bench(fn, reps_ms: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=reps_ms, return_mode="median"))


def measure(impl: str, b: int, s: int, h: int, d: int, causal: bool, reps_ms: int):
    """(fwd ms, bwd ms, fwd+bwd ms) for impl in {"triton", "sdpa"}."""
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v, do = mk().requires_grad_(), mk().requires_grad_(), mk().requires_grad_(), mk()
    if impl == "triton":
        f = lambda: flash_attention(q, k, v, causal=causal, impl="triton")
        ctx = None
    else:
        f = lambda: sdpa(q, k, v, causal)
        ctx, _ = flash_ctx()
    import contextlib

    with ctx if ctx is not None else contextlib.nullcontext():
        o = f()
        fwd = bench(f, reps_ms)
        bwd = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), reps_ms)

        def both():
            torch.autograd.grad(f(), (q, k, v), do)

        fb = bench(both, reps_ms)
    return fwd, bwd, fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--test-timeout", type=float, default=180.0)
    args = ap.parse_args()
    t_start = time.time()
    assert torch.cuda.is_available(), "this script needs a CUDA device"
    dev = device_name("cuda")
    tests = "skipped (--no-tests)" if args.no_tests else run_tests(args.test_timeout)
    print(f"GPU tests: {tests}", flush=True)

    seqlens = [512, 2048, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    _, backend = flash_ctx()
    rows, tokens = [], 16384
    for d in (64, 128):
        h = 2048 // d
        for causal in (False, True):
            for s in seqlens:
                b = max(1, tokens // s)
                fl_fwd = 4 * b * h * s * s * d / (2 if causal else 1)
                fl = (fl_fwd, 2.5 * fl_fwd, 3.5 * fl_fwd)
                res = {}
                for impl in ("triton", "sdpa"):
                    try:
                        ms = measure(impl, b, s, h, d, causal, reps_ms=30)
                        res[impl] = [f_ / (m * 1e-3) / 1e12 for f_, m in zip(fl, ms)]
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        res[impl] = None
                        print(f"{impl} d={d} causal={causal} s={s} failed: {e!r}", flush=True)
                t, r = res["triton"], res["sdpa"]
                cell = lambda x, i: "fail" if x is None else f"{x[i]:.0f}"
                ratio = "n/a" if (t is None or r is None) else f"{t[2] / r[2]:.2f}x"
                rows.append([d, "yes" if causal else "no", s, b, h, cell(t, 0), cell(r, 0),
                             cell(t, 1), cell(r, 1), cell(t, 2), cell(r, 2), ratio])
                print(rows[-1], f"[{time.time() - t_start:.0f}s]", flush=True)

    tuned = []
    try:
        from haillm.flashattn import ops

        for kind, tuner in ops._TUNED.items():
            for key, cfg in getattr(tuner, "cache", {}).items():
                tuned.append(f"{kind} {key[:4]}: {cfg}")
    except Exception:  # noqa: BLE001
        pass
    if tuned:
        print("autotuned configs:\n  " + "\n  ".join(tuned))
    notes = (
        f"Measured on **{dev}**, torch {torch.__version__}, bf16, batch x seqlen = 16k tokens, "
        f"nheads = 2048 / headdim; SDPA backend: {backend}. TFLOP/s with FLOPs = 4·b·h·s²·d "
        "forward (halved for causal), backward 2.5x forward; medians of "
        "`triton.testing.do_bench`. `ratio` = triton / SDPA, forward+backward. "
        f"GPU tests (`pytest -m gpu tests/flashattn`): {tests}. Script: "
        "`benchmarks/gpu_flashattn.py`."
    )
    headers = ["headdim", "causal", "seqlen", "batch", "heads", "fwd triton", "fwd SDPA",
               "bwd triton", "bwd SDPA", "fwd+bwd triton", "fwd+bwd SDPA", "ratio"]
    table = write_table(PAGE, "GPU: TFLOP/s, Triton vs SDPA (bf16)", headers, rows, notes)
    print(f"\ntotal {time.time() - t_start:.0f}s\n")
    print(table)


if __name__ == "__main__":
    main()
