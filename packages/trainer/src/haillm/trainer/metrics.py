"""FLOPs, MFU and the run's logs: a progress line, `metrics.jsonl`, optional TensorBoard.

Model FLOPs per token (what MFU counts; recomputation is not "useful" work):
``6 * N + 12 * n_layers * d_model * seq_len`` where N is the parameter count without the
embedding table (a lookup, no matmul; the untied head is a real GEMM and counts), and the
second term is the attention score and value products (PaLM's appendix B convention,
counted as if not causal). MFU = achieved model FLOP/s / peak FLOP/s of the devices used.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from haillm.trainer.config import ModelConfig

__all__ = ["DEVICE_PEAK_TFLOPS", "MetricsLogger", "device_peak_flops", "flops_per_token",
           "measure_cpu_peak"]

# dense peak TFLOP/s (no sparsity), per GPU: (bf16/fp16 tensor cores, fp32 via TF32)
DEVICE_PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),  # SXM; the PCIe card is lower (756)
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5),
    "V100": (125.0, 15.7),
}


def flops_per_token(m: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12 L d S (forward + backward)."""
    s = seq_len or m.seq_len
    return 6.0 * m.n_params(embedding=False) + 12.0 * m.n_layers * m.hidden_size * s


def measure_cpu_peak(threads: int = 1, n: int = 384, repeats: int = 5) -> float:
    """FLOP/s of an fp32 (n x n) matmul with `threads` threads: the CPU's practical peak."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2.0 * n**3 / best


def device_peak_flops(device: str, precision: str, world: int) -> tuple[float, str]:
    """Peak FLOP/s of all `world` ranks and a description of where the number comes from."""
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, (half, fp32) in DEVICE_PEAK_TFLOPS.items():
            if key in name:
                per = (fp32 if precision == "fp32" else half) * 1e12
                return per * world, f"{name}: {per / 1e12:.0f} TFLOP/s x {world} (table)"
        return float("nan"), f"{name}: not in the peak table"
    cores = min(world * torch.get_num_threads(), os.cpu_count() or 1)
    per = measure_cpu_peak(1)
    return per * cores, f"CPU: measured fp32 matmul {per / 1e9:.1f} GFLOP/s/core x {cores} cores"


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLogger:
    """Rank 0's logs: one JSON object per optimizer step in `<out>/metrics.jsonl` (appended),
    a progress line on stdout, TensorBoard scalars when `tensorboard` is installed."""

    def __init__(self, out: Path, total_steps: int, *, enabled: bool = True,
                 tensorboard: bool = True, log_every: int = 1, stream=None):
        self.enabled, self.total, self.log_every = enabled, total_steps, log_every
        self.stream = stream or sys.stdout
        self.t_start = time.perf_counter()
        self.first_step_time: float | None = None
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = (out / "metrics.jsonl").open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSON log is the record
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if "loss" not in record:
            return
        if self.first_step_time is None:
            self.first_step_time = time.perf_counter()
            done0 = step
            self._done0 = done0
        if step % self.log_every and step != self.total:
            return
        frac = step / max(self.total, 1)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        elapsed = time.perf_counter() - self.first_step_time
        per = elapsed / max(step - self._done0, 1)
        eta = per * (self.total - step)
        val = f" | val {record['val_loss']:.3f}" if "val_loss" in record else ""
        print(f"[{bar}] step {step}/{self.total} | loss {record['loss']:.4f}{val} | "
              f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.2f} | "
              f"{record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.2f}% | "
              f"comm {100 * record.get('comm_fraction', 0):.0f}% | ETA {_fmt_time(eta)}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
