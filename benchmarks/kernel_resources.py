"""Resources of every Triton kernel as compiled for sm_90 and sm_80, measured without a GPU.

    uv run python benchmarks/kernel_resources.py      # ~4 min on 2 CPU cores, clean cache
    PYTHONPATH=<dir holding another triton> uv run python benchmarks/kernel_resources.py \
        --other-triton 90                             # one more section: that Triton, sm_90

Runs tests/kernels_compile.py (a compile-only Triton driver: the packages' own launchers, the
real NVIDIA backend and `ptxas`, nothing executes) for both architectures and writes
docs/benchmarks/kernels.md: shared memory per block, registers per thread and spilled bytes
(local memory) of each compiled binary. Spills are what a GPU profile would show first as a
slow kernel; shared memory above the device limit is a launch failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parent.parent
PAGE = "kernels.md"


def compile_report(arch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.json"
        subprocess.run([sys.executable, str(ROOT / "tests" / "kernels_compile.py"), "--arch",
                        str(arch), "--json", str(out)], env=env, check=True)
        return json.loads(out.read_text())


def other_triton(arch: int):
    """A summary section for the Triton on PYTHONPATH (e.g. the GPU image's older one)."""
    rep = compile_report(arch)
    recs = rep["records"]
    spill = [r for r in recs if r["spill_bytes"]]
    most: dict[str, int] = {}
    for r in spill:
        most[r["kernel"]] = max(most.get(r["kernel"], 0), r["spill_bytes"])
    worst = sorted(most.items(), key=lambda x: -x[1])
    harness.write_table(PAGE, f"Triton {rep['triton']}, sm_{arch}", [
        "binaries", "failures", "without spills", "largest spill per kernel (B)"],
        [[len(recs), len(rep["failures"]), len(recs) - len(spill),
          ", ".join(f"{k}: {b}" for k, b in worst) or "none"]],
        notes="The same cases compiled by another Triton release (`--other-triton`).")


def main():
    if "--other-triton" in sys.argv:
        other_triton(int(sys.argv[sys.argv.index("--other-triton") + 1]))
        return
    reports = {arch: compile_report(arch) for arch in (90, 80)}
    intro = ("Measured by `benchmarks/kernel_resources.py` on a machine **without a GPU**: "
             f"triton {reports[90]['triton']} compiles each launch of the packages' own "
             "launchers (GPU block sizes, warps, stages, every autotune candidate) to a cubin; "
             "`cuobjdump -res-usage` reads registers and local memory. Nothing here is a timing.")
    rows = []
    for arch, rep in reports.items():
        recs = rep["records"]
        spill = [r for r in recs if r["spill_bytes"]]
        rows.append([f"sm_{arch}", len(recs), len(recs) - len(spill),
                     max(r["shared"] for r in recs) // 1024, len(rep["failures"])])
    harness.write_table(PAGE, "Summary", ["target", "binaries", "without spills",
                                          "max shared KiB", "failures"], rows, notes=intro)
    # One row per (case, kernel, n-th binary of that kernel in the case): autotune candidates
    # of the GEMMs are listed in the order of their configs.
    def keyed(rep):
        out, seen = {}, {}
        for r in rep["records"]:
            k = (r["case"], r["kernel"])
            seen[k] = seen.get(k, 0) + 1
            out[(*k, seen[k])] = r
        return out
    k90, k80 = keyed(reports[90]), keyed(reports[80])

    def cells(r):
        if r is None:
            return ["–", "–", "–"]
        spill = f"**{r['spill_bytes']}**" if r["spill_bytes"] else "0"
        return [f"{r['shared'] / 1024:.1f}", r["regs"], spill]

    rows = [[case, kernel + (f" #{i}" if i > 1 or (case, kernel, 2) in k90 else ""),
             *cells(k90.get((case, kernel, i))), *cells(k80.get((case, kernel, i)))]
            for (case, kernel, i) in k90]
    harness.write_table(PAGE, "Per kernel", [
        "case", "kernel", "sm_90 shared KiB", "sm_90 regs", "sm_90 spill B",
        "sm_80 shared KiB", "sm_80 regs", "sm_80 spill B"], rows, notes=(
        "`#n`: the n-th autotune candidate (configs in `fusedops/gemm/ops.py`). 255 registers "
        "is the per-thread maximum; a spill is local memory traffic inside the kernel's loop. "
        "The fp32 attention path uses IEEE products on the FMA units (no tensor cores), hence "
        "its small tiles; the sm_90 GEMM configs with TMA do not apply on sm_80 (pointer "
        "loads there)."))
    print((harness.DOCS / PAGE).read_text()[:3000])


if __name__ == "__main__":
    main()
