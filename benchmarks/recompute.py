"""Activation recomputation: saved activation memory and step time per mode, plan alongside.

    OMP_NUM_THREADS=1 uv run python benchmarks/recompute.py [--device cpu|cuda]

For each model (the `tiny` preset and a wider one) and each `parallel.recompute` mode, one
rank's model (`parallelize` at dp = tp = pp = 1, the run's own fused-op and attention
choices) runs forward + backward of one micro-batch (2 x seq_len tokens, fp32 on CPU, bf16 on
CUDA):

* **saved**: the bytes autograd keeps for backward at the end of the forward (every distinct
  storage reaching `saved_tensors_hooks`, parameters excluded): what stays alive per
  micro-batch in flight, next to `haillm.trainer.plan.activation_bytes`;
* **peak** (CUDA only): `torch.cuda.max_memory_allocated` over forward + backward above the
  parameters and gradients, which adds the recompute workspace (one block's activations,
  rebuilt in its backward) and the transient gradients; the plan's column is saved +
  `recompute_workspace`;
* **step time**: forward + backward (CUDA: median of `harness.time_fn`; CPU: the modes timed
  interleaved, the fastest of 15 rounds each), and the plan's extra FLOPs
  (`recompute_flops_per_token`).

Then the planner for the paper's 67B layout (dp = 8, tp = 8, pp = 4, 16 micro-batches, bf16,
flash attention) per mode. Writes `docs/benchmarks/recompute.md` and
`docs/benchmarks/img/recompute.png` (+ .svg).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.trainer.memory

import torch  # noqa: E402
from harness import DOCS, device_name, peak_memory, time_fn, write_table  # noqa: E402

from haillm.parallel import ParallelDims  # noqa: E402
from haillm.trainer import DeepSeekLM, load_config  # noqa: E402
from haillm.trainer.metrics import flops_per_token  # noqa: E402
from haillm.trainer.parallelize import parallelize  # noqa: E402
from haillm.trainer.plan import (  # noqa: E402
    activation_bytes,
    plan,
    plan_config,
    recompute_flops_per_token,
    recompute_workspace,
)
from tests.trainer.memory import saved_bytes  # noqa: E402

MODES = ("none", "selective", "full")
MODELS = {
    "tiny": [],
    "wide": ["model.hidden_size=512", "model.intermediate_size=1376", "model.n_heads=8",
             "model.n_kv_heads=8", "model.n_layers=6"],
    "wide-plain": ["model.hidden_size=512", "model.intermediate_size=1376",
                   "model.n_heads=8", "model.n_kv_heads=8", "model.n_layers=6",
                   "parallel.fused_swiglu=false"],
}
B = 2
PAGE = "recompute.md"


def _cfg(model: str, mode: str, device: str):
    prec = "bf16" if device == "cuda" else "fp32"
    return load_config("tiny", overrides=[
        *MODELS[model], f"parallel.recompute={mode}", "parallel.microbatches=1",
        f"train.global_batch={B}", f"train.precision={prec}", f"run.device={device}"])


def measure(model: str, device: str, rounds: int = 15) -> dict[str, dict]:
    """Every mode of `model`: saved bytes, plan, and the step time. On CPU the modes are
    timed interleaved, `rounds` times, and the fastest round of each is kept: on a shared
    machine the minimum is the estimate that other processes' load disturbs least."""
    import time

    out, steps = {}, {}
    for mode in MODES:
        cfg = _cfg(model, mode, device)
        m = cfg.model
        chunk = parallelize(DeepSeekLM(m, seed=0, lazy=True), ParallelDims().build(), cfg,
                            data_parallel=False)[0]
        x = torch.randint(0, m.vocab_size, (B, m.seq_len),
                          generator=torch.Generator().manual_seed(0)).to(device)

        def step(chunk=chunk, x=x):
            chunk(x, x).backward()

        step()  # gradients allocated: the peak below is activations (+ transient grads)
        steps[mode] = step
        out[mode] = {"saved": saved_bytes(chunk, x, x)[0],
                     "plan": activation_bytes(cfg, m.n_layers, first=True, last=True),
                     "workspace": recompute_workspace(cfg, m.n_layers),
                     "extra_flops": recompute_flops_per_token(cfg) / flops_per_token(m),
                     "peak": peak_memory(step, device=device) if device == "cuda" else None}
    if device == "cuda":
        for mode in MODES:
            out[mode]["ms"] = time_fn(steps[mode], device=device)
        return out
    best = {mode: float("inf") for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            t0 = time.perf_counter()
            steps[mode]()
            best[mode] = min(best[mode], time.perf_counter() - t0)
    for mode in MODES:
        out[mode]["ms"] = 1e3 * best[mode]
    return out


def _mib(x: float) -> str:
    return f"{x / 2**20:,.2f}"


def figure(results: dict, device: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.38
    labels = [f"{mo}\n{mode}" for mo in MODELS for mode in MODES]
    xs = range(len(labels))
    saved = [results[mo][mode]["saved"] / 2**20 for mo in MODELS for mode in MODES]
    planned = [results[mo][mode]["plan"] / 2**20 for mo in MODELS for mode in MODES]
    ax = axes[0]
    ax.bar([x - width / 2 for x in xs], saved, width, label="measured (saved for backward)",
           color="#4C72B0")
    ax.bar([x + width / 2 for x in xs], planned, width, label="haillm-plan", color="#DD8452")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("MiB per micro-batch (one rank)")
    ax.set_title("activation memory per mode")
    ax.legend(fontsize=8)
    ax = axes[1]
    for mo, c in zip(MODELS, ("#4C72B0", "#55A868", "#C44E52")):
        base = results[mo]["none"]["ms"]
        ax.plot(MODES, [results[mo][mode]["ms"] / base for mode in MODES], "o-", color=c,
                label=f"{mo}: measured")
        ax.plot(MODES, [(1 + results[mo][mode]["extra_flops"] * 1.0) for mode in MODES], "x--",
                color=c, label=f"{mo}: plan (FLOPs)")
    ax.set_ylabel("step time / step time of none")
    ax.set_title(f"forward + backward time ({device})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    img = DOCS / "img" / "recompute.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)
    fig.savefig(img.with_suffix(".svg"))
    return img


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {mo: measure(mo, a.device) for mo in MODELS}
    rows = []
    for mo in MODELS:
        for mode in MODES:
            r = results[mo][mode]
            base = results[mo]["none"]
            row = [mo, mode, _mib(r["saved"]), _mib(r["plan"]),
                   f"{100 * (r['plan'] / r['saved'] - 1):+.1f} %",
                   f"{r['saved'] / base['saved']:.2f}"]
            if a.device == "cuda":
                row += [_mib(r["peak"]), _mib(r["plan"] + r["workspace"])]
            row += [f"{r['ms']:.1f}", f"{r['ms'] / base['ms']:.2f}",
                    f"+{100 * r['extra_flops']:.0f} %"]
            rows.append(row)
    cfg = _cfg("tiny", "none", a.device)
    headers = ["model", "recompute", "saved MiB", "plan MiB", "plan error", "vs none"]
    if a.device == "cuda":
        headers += ["peak MiB", "plan + workspace MiB"]
    headers += ["fwd+bwd ms", "vs none", "plan: extra FLOPs"]
    notes = (f"One rank (dp = tp = pp = 1), one micro-batch of {B} x {cfg.model.seq_len} tokens, "
             f"{cfg.train.precision}, the CPU defaults (fused ops on: their PyTorch paths; "
             f"tiled flash attention). `tiny`: d = 128, 4 layers, f = 344; `wide`: d = 512, "
             f"6 layers, f = 1376, 8 heads; `wide-plain`: the same with `parallel.fused_swiglu = false` "
             f"(the GEMM, then silu(gate) * up: what selective checkpoints). Measured on {device_name(a.device)} with "
             "`benchmarks/recompute.py` (time: fastest of 15 interleaved rounds). *saved*: bytes autograd keeps for backward after the "
             "forward (what each micro-batch in flight holds); *plan*: "
             "`haillm.trainer.plan.activation_bytes`.")
    text = write_table(PAGE, f"Saved activations and step time per mode ({a.device})",
                       headers, rows, notes)
    print(text)
    rows67 = []
    for mode in MODES:
        p0 = plan(plan_config("deepseek-67b", dp=8, tp=8, pp=4, microbatches=16,
                              recompute=mode))[0]
        rows67.append([mode, f"{p0.activations_per_microbatch / 2**30:.2f}", p0.in_flight,
                       f"{p0.recompute_workspace / 2**30:.2f}", f"{p0.activations / 2**30:.2f}",
                       f"{p0.total / 2**30:.2f}", f"{p0.flops_per_rank:.3e}"])
    text = write_table(PAGE, "haillm-plan: DeepSeek LLM 67B, stage 0, per mode",
                       ["recompute", "activations / micro-batch GiB", "in flight",
                        "workspace GiB", "activations GiB", "total GiB", "FLOPs per rank"],
                       rows67, "dp = 8, tp = 8 (SP), pp = 4, 16 micro-batches of 1 x 4096 "
                       "tokens, bf16, ZeRO-1, flash attention and the fused kernels (CUDA): "
                       "`haillm-plan --preset deepseek-67b --dp 8 --tp 8 --pp 4 "
                       "--microbatches 16 --recompute MODE`.")
    print(text)
    print("wrote", DOCS / PAGE, figure(results, a.device))


if __name__ == "__main__":
    main()
