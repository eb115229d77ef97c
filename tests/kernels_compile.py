"""Compile every Triton kernel of the repository for a real GPU, on a machine without one.

The interpreter (`TRITON_INTERPRET=1`) checks what the kernels compute, but not that they
*compile*: it does no bf16 arithmetic, ignores `num_warps`/`num_stages`, never runs the
register allocator and never checks shared memory. This tool closes that gap without a GPU.

How: Triton's JIT asks its *active driver* for the target and for a launcher. We install a
driver that answers "sm_90 (or sm_80), device 0" and whose launcher does nothing, then call the
packages' own launchers (the code a GPU run goes through: block sizes, `num_warps`, autotune
configs, TMA descriptors) with CPU tensors. Every launch is compiled by Triton's real NVIDIA
backend down to a cubin with the wheel's `ptxas`, and nothing runs. For each compiled kernel
we record shared memory (checked against the device limit, as the CUDA driver would at load
time), registers and spills (`cuobjdump -res-usage` on the cubin).

    python tests/kernels_compile.py --arch 90 [--quick] [--json out.json]

Exit status 0 when every case compiles and fits; the table is printed last. Used by
`tests/test_kernels_compile.py` and `benchmarks/kernel_resources.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the JIT must be the compiling one
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(p) for p in sorted((ROOT / "packages").glob("*/src"))]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402

# What the CUDA driver would refuse at load time, per architecture (bytes of dynamic shared
# memory per block with the opt-in; threads per block).
LIMITS = {90: dict(shared=232448, threads=1024, name="sm_90 (H100/H200)"),
          80: dict(shared=166912, threads=1024, name="sm_80 (A100)")}
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class CompileOnlyDriver:
    """A Triton driver that targets `arch` and never touches a device."""

    backend = "cuda"

    def __init__(self, arch: int):
        self.arch = arch
        self.compiled: list[dict] = []  # one record per kernel binary "loaded"
        self.case = ""
        self.utils = self  # Triton calls driver.utils.load_binary / get_device_properties
        self.launcher_cls = lambda src, metadata: (lambda *args, **kwargs: None)

    # -- what the JIT and the autotuner ask for
    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        def bench(fn, *args, quantiles=None, **kwargs):  # compile the config, time nothing
            fn()
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass

    def map_python_to_cpp_type(self, ty):
        return ty

    # -- driver.utils
    def get_device_properties(self, device):
        return {"max_shared_mem": LIMITS[self.arch]["shared"], "max_num_regs": 65536,
                "multiprocessor_count": 132, "warpSize": 32}

    def load_binary(self, name, cubin, shared, device):
        regs, spill = _resource_usage(cubin)
        self.compiled.append(dict(case=self.case, kernel=name, shared=int(shared), regs=regs,
                                  spill_bytes=spill))
        return None, None, regs, spill, LIMITS[self.arch]["threads"]


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes) of the first function in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(_CUOBJDUMP), "-res-usage", f.name], capture_output=True,
                             text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    spill = max(int(stack.group(1)) if stack else 0, int(local.group(1)) if local else 0)
    return (int(reg.group(1)) if reg else -1), spill


# --------------------------------------------------------------------------- the cases
# Each case calls a package's own launcher(s) with CPU tensors shaped like a real call.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def flash_case(dtype, headdim, causal, varlen=False):
    def run():
        from haillm.flashattn import ops

        lens = [100, 157] if varlen else [128, 128]
        cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
        T = sum(lens)
        q = _randn(T, 8, headdim, dtype=dtype)
        k, v = _randn(T, 2, headdim, dtype=dtype), _randn(T, 2, headdim, dtype=dtype)
        o, lse = ops._fwd(q, k, v, cu, cu, max(lens), max(lens), causal, headdim ** -0.5)
        ops._bwd(o, q, k, v, o, lse, cu, cu, max(lens), max(lens), causal, headdim ** -0.5)
    return run


def norm_case(dtype, n, rms, residual):
    def run():
        from haillm.fusedops.norm import ops as norm_ops

        x = _randn(64, n, dtype=dtype)
        w = _randn(n, dtype=dtype)
        b = None if rms else _randn(n, dtype=dtype)
        r = _randn(64, n, dtype=dtype) if residual else None
        y, h, mean, rstd = norm_ops.norm_fwd(x, w, b, r, 1e-5, rms)
        norm_ops.norm_bwd(y, h if h is not None else x, w, b, mean, rstd,
                          y if residual else None, dtype, rms)
    return run


def adamw_case(grad_dtype, copy_dtype):
    def run():
        from haillm.fusedops.adamw.ops import adamw_step_triton_

        p = torch.randn(10_000)
        g = torch.randn(10_000).to(grad_dtype)
        copy = None if copy_dtype is None else torch.empty(10_000, dtype=copy_dtype)
        adamw_step_triton_(p, g, torch.zeros_like(p), torch.zeros_like(p), step=1, lr=1e-3,
                           beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, param_copy=copy)
    return run


def ce_case(dtype, vocab, mean):
    def run():
        from haillm.fusedops.cross_entropy.ops import _rows_triton

        x = _randn(8, vocab, dtype=dtype)
        t = torch.randint(0, vocab, (8,))
        _rows_triton(x, t, torch.ones(1), ignore_index=-100, label_smoothing=0.1, z_loss=1e-4,
                     mean=mean, write_grad=True)
    return run


def gemm_case(dtype, kind, tma=None):
    def run():
        from haillm.fusedops.gemm import ops

        M, N, K = 256, 352, 512  # N not a multiple of the tile: masked tails
        x = _randn(M, K, dtype=dtype)
        if kind == "swiglu":
            w = _randn(2 * N, K, dtype=dtype)
            ops.swiglu_fwd_triton(x, w, tma=tma)
            ops.swiglu_bwd_triton(x, w, _randn(M, N, dtype=dtype), tma=tma)
        else:
            ops.residual_fwd_triton(x, _randn(N, K, dtype=dtype), _randn(M, N, dtype=dtype))
    return run


def cases(quick: bool = False, arch: int = 90) -> dict[str, object]:
    """name -> callable. `quick`: the configurations the trainer and the GPU tests use most."""
    out = {}
    tma = None if arch >= 90 else False  # the launcher decides from the device on a real GPU
    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    for dt in dtypes:
        for hd in ([64, 128] if quick else [32, 64, 80, 128]):
            for causal in (True,) if quick else (False, True):
                out[f"flashattn {dt} hd{hd} {'causal' if causal else 'full'}"] = \
                    flash_case(DTYPES[dt], hd, causal)
        # head dims 129..256 (FlashAttention-2's range) share BLOCK_D = 256: one case per
        # config (fp16 has bf16's), to keep the compile time down
        if dt != "fp16":
            out[f"flashattn {dt} hd256 causal"] = flash_case(DTYPES[dt], 256, True)
    out["flashattn bf16 hd128 causal varlen"] = flash_case(torch.bfloat16, 128, True, True)
    for dt in dtypes:
        for n in ([4096] if quick else [1000, 4096, 20000]):  # one block / looped blocks
            for rms in (True, False):
                out[f"norm {dt} N={n} {'rms' if rms else 'layer'}+residual"] = \
                    norm_case(DTYPES[dt], n, rms, True)
        out[f"norm {dt} N=4096 rms"] = norm_case(DTYPES[dt], 4096, True, False)
    for g, c in [("fp32", None), ("bf16", "bf16"), ("fp32", "fp16")]:
        out[f"adamw grad {g} copy {c}"] = adamw_case(DTYPES[g], DTYPES.get(c))
    for dt in dtypes:
        for mean in (True, False):
            out[f"cross_entropy {dt} {'mean' if mean else 'sum'}"] = \
                ce_case(DTYPES[dt], 32000, mean)
    for dt in dtypes:
        out[f"gemm swiglu {dt}"] = gemm_case(DTYPES[dt], "swiglu", tma)
        out[f"gemm residual {dt}"] = gemm_case(DTYPES[dt], "residual")
    if arch >= 90:
        out["gemm swiglu bf16 no-TMA"] = gemm_case(torch.bfloat16, "swiglu", tma=False)
    return out


def all_kernels() -> set[str]:
    """Names of every launchable `@triton.jit` kernel (`*_kernel`) in the packages' kernel files."""
    import importlib

    from triton.runtime.jit import JITFunction

    names = set()
    for src in sorted((ROOT / "packages").glob("*/src")):
        for path in sorted(src.glob("haillm/**/*kernels.py")):
            module = importlib.import_module(".".join(path.relative_to(src).with_suffix("").parts))
            names |= {n for n, obj in vars(module).items()
                      if isinstance(obj, JITFunction) and n.endswith("_kernel")}
    return names


def run(arch: int, quick: bool = False, only: str | None = None) -> tuple[list[dict], list]:
    drv = CompileOnlyDriver(arch)
    _driver.set_active(drv)
    failures = []
    for name, fn in cases(quick, arch).items():
        if only and only not in name:
            continue
        drv.case, start = name, time.perf_counter()
        n_before = len(drv.compiled)
        try:
            fn()
        except Exception as e:  # noqa: BLE001  report every failing case, not only the first
            failures.append((name, f"{type(e).__name__}: {e}", traceback.format_exc()))
        took = time.perf_counter() - start
        if len(drv.compiled) == n_before and not any(f[0] == name for f in failures):
            failures.append((name, "no kernel was compiled (did the launcher fall back?)", ""))
        for rec in drv.compiled[n_before:]:
            rec["seconds"] = round(took / max(1, len(drv.compiled) - n_before), 2)
    # The autotuner "loads" its winner once more: keep one record per distinct binary.
    seen, records = set(), []
    for rec in drv.compiled:
        key = (rec["case"], rec["kernel"], rec["shared"], rec["regs"], rec["spill_bytes"])
        if key not in seen:
            seen.add(key)
            records.append(rec)
    missing = all_kernels() - {r["kernel"] for r in records}
    if not only and missing:
        failures.append(("coverage", f"kernels no case compiled: {sorted(missing)}", ""))
    limit = LIMITS[arch]["shared"]
    for rec in records:
        if rec["shared"] > limit:
            failures.append((rec["case"], f"{rec['kernel']}: {rec['shared']} B of shared memory"
                             f" > {limit} B on {LIMITS[arch]['name']}", ""))
    return records, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS))
    ap.add_argument("--quick", action="store_true", help="fewer dtypes/shapes")
    ap.add_argument("--only", help="cases whose name contains this")
    ap.add_argument("--json", help="write the records and failures here")
    args = ap.parse_args(argv)
    start = time.time()
    records, failures = run(args.arch, args.quick, args.only)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            arch=args.arch, triton=triton.__version__, records=records,
            failures=[dict(case=c, error=e) for c, e, _ in failures]), indent=1))
    for case, err, tb in failures:
        print(f"FAILED {case}: {err}\n{tb}", file=sys.stderr)
    print(f"{'case':44} {'kernel':28} {'shared KiB':>10} {'regs':>5} {'spill B':>7}")
    for r in records:
        print(f"{r['case']:44} {r['kernel']:28} {r['shared'] / 1024:10.1f} {r['regs']:5d} "
              f"{r['spill_bytes']:7d}")
    print(f"{len(records)} kernels compiled for {LIMITS[args.arch]['name']} with triton "
          f"{triton.__version__} in {time.time() - start:.0f} s; {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
