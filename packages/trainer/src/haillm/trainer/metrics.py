"""FLOPs, MFU and the run's logs: a progress line, `metrics.jsonl`, optional TensorBoard.

Model FLOPs per token (what MFU counts; recomputation is not "useful" work):
``6 * N + 12 * n_layers * d_model * seq_len`` where N is the parameter count without the
embedding table (a lookup, no matmul; the untied head is a real GEMM and counts), and the
second term is the attention score and value products (PaLM's appendix B convention,
counted as if not causal). MFU = achieved model FLOP/s / peak FLOP/s of the devices used.

On a GPU the peak is the data sheet's dense tensor-core number. On a CPU there is no data
sheet: the peak is an fp32 matmul measured per core and multiplied by the cores in use. A
measurement taken while other jobs load the machine reads low (and MFU high), so the best
value ever measured on this CPU is cached (`~/.cache/haillm/cpu-peak.json`) and used: MFU on
CPU is "the share of the best matmul speed this CPU has shown".
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from haillm.trainer.config import ModelConfig

__all__ = ["DEVICE_PEAK_TFLOPS", "MetricsLogger", "device_peak_flops", "flops_per_token",
           "fmt_time", "measure_cpu_peak"]

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
    now = measure_cpu_peak(1)
    per = _best_cpu_peak(now)
    how = "measured now" if per == now else f"best seen on this CPU; {now / 1e9:.1f} now"
    return per * cores, (f"CPU: fp32 matmul {per / 1e9:.1f} GFLOP/s/core ({how}) x {cores} "
                         "cores")


def _cpu_key() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        name)
    except OSError:
        pass
    return f"{name} | torch {torch.__version__.split('+')[0]}"


def _best_cpu_peak(measured: float) -> float:
    """max(measured, the cached best for this CPU); the cache keeps the max (best effort)."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "haillm" / \
        "cpu-peak.json"
    key = _cpu_key()
    try:
        table = json.loads(path.read_text())
        best = float(table.get(key, 0.0))
    except (OSError, ValueError, AttributeError):
        table, best = {}, 0.0
    if measured > best:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({**table, key: measured}))
            os.replace(tmp, path)
        except OSError:
            pass
    return max(measured, best)


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"



class _Console:
    """The progress line on a terminal stays open (updated in place with '\\r'); anything
    else printed meanwhile (a saved checkpoint, a warning) first ends it."""

    open_stream = None

    @classmethod
    def end_line(cls) -> None:
        if cls.open_stream is not None:
            try:
                print(file=cls.open_stream, flush=True)
            except (OSError, ValueError):
                pass
            cls.open_stream = None


def end_progress_line() -> None:
    """End an open in-place progress line before printing something else."""
    _Console.end_line()


class MetricsLogger:
    """Rank 0's logs: one JSON object per optimizer step in `<out>/metrics.jsonl` (appended),
    a progress line on stdout (updated in place on a terminal, one line per step otherwise),
    TensorBoard scalars when `tensorboard` is installed."""

    def __init__(self, out: Path, total_steps: int, *, enabled: bool = True,
                 tensorboard: bool = True, log_every: int = 1, stream=None):
        self.enabled, self.total, self.log_every = enabled, total_steps, log_every
        self.stream = stream or sys.stdout
        self.t_start = time.perf_counter()
        self.first_step_time: float | None = None
        self._last_t: float | None = None
        self._durations: list[float] = []
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
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
        now = time.perf_counter()
        # seconds per step: wall time between log calls (evaluation and saves included); the
        # first step of this process (or of a resume) has only its own step time to go on
        if self._last_t is None:
            self.first_step_time = now
            self._durations.append(float(record.get("step_time_s", 0.0)))
        else:
            self._durations.append(now - self._last_t)
            if len(self._durations) == 2:
                self._durations.pop(0)  # the first step (warm-up) is not typical
        self._last_t = now
        if step % self.log_every and step != self.total:
            return
        recent = self._durations[-20:]
        eta = sum(recent) / len(recent) * (self.total - step)
        frac = step / max(self.total, 1)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        val = f" | val {record['val_loss']:.3f}" if "val_loss" in record else ""
        line = (f"[{bar}] step {step}/{self.total} | loss {record['loss']:.4f}{val} | "
                f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.2f} | "
                f"{record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.2f}% | "
                f"comm {100 * record.get('comm_fraction', 0):.0f}% | ETA {fmt_time(eta)}")
        if self.tty:  # in place; a validation result stays on screen
            print("\r" + line + "\x1b[K", end="", file=self.stream, flush=True)
            _Console.open_stream = self.stream
            if val or step == self.total:
                _Console.end_line()
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        _Console.end_line()
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
