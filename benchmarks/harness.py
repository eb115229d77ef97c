"""Shared measuring tools for `benchmarks/`: time, peak memory, Markdown tables.

    from harness import time_fn, peak_memory, write_table

* `time_fn(fn)` -> median milliseconds. GPU: `triton.testing.do_bench` (CUDA events, warm-up,
  L2 flushed between runs). CPU: `torch.utils.benchmark.Timer.blocked_autorange`.
* `peak_memory(fn)` -> peak bytes. GPU: `torch.cuda.max_memory_allocated` around one call.
  CPU: allocator peaks are invisible to torch, so each configuration runs in a *fresh*
  subprocess; there the peak-RSS mark is reset after imports and setup (Linux `clear_refs`),
  and we report the new peak minus the RSS right before the call (imports and inputs
  excluded). Elsewhere, `ru_maxrss` before and after.
* `write_table(path, title, headers, rows, notes)` writes (or replaces) one Markdown table
  section in a page of `docs/benchmarks/`, and returns the table as text for printing.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import re
import resource
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"

__all__ = ["DOCS", "device_name", "fmt", "peak_memory", "peak_memory_subprocess", "time_fn", "write_table"]


def device_name(device: str | torch.device = "cpu") -> str:
    """A human name for the machine a table was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def time_fn(fn: Callable[[], Any], *, device: str | torch.device | None = None,
            warmup: int = 3, min_run_time: float = 0.5) -> float:
    """Median wall time of `fn()` in milliseconds (after `warmup` calls)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def peak_memory(fn: Callable[[], Any], *, device: str | torch.device = "cuda") -> int:
    """Peak bytes allocated on a CUDA device during `fn()`, above what was allocated before."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("peak_memory measures CUDA memory; on CPU use peak_memory_subprocess")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux: make the high-water mark (VmHWM) equal the current RSS (`clear_refs` code 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _rss_child(setup: Callable[..., Any], run: Callable[[Any], Any], args: tuple, conn) -> None:
    try:
        torch.set_num_threads(1)
        state = setup(*args)
        if _reset_peak_rss():
            # The peak from imports/setup is forgotten: growth = new peak - current RSS.
            before = _status_kib("VmRSS")
            run(state)
            after = _status_kib("VmHWM")
        else:
            # ru_maxrss is a lifetime high-water mark: the import spike may hide small runs.
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            run(state)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send(("ok", (after - before) * 1024, before * 1024))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", repr(e), 0))
    finally:
        conn.close()


def peak_memory_subprocess(setup: Callable[..., Any], run: Callable[[Any], Any], *args: Any,
                           timeout: float = 600.0) -> int:
    """Peak RSS growth (bytes) of `run(setup(*args))` in a fresh spawned process.

    `setup` builds the inputs (not counted, except that the high-water mark starts there);
    `run` does the measured work. Both must be module-level functions (they are pickled).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_rss_child, args=(setup, run, args, child))
    p.start()
    child.close()
    if not parent.poll(timeout):
        p.kill()
        raise TimeoutError(f"memory measurement did not finish within {timeout}s")
    status, value, _ = parent.recv()
    p.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement failed in the subprocess: {value}")
    return int(value)


def fmt(x: float, digits: int = 2) -> str:
    """Compact number formatting for tables."""
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def write_table(page: str | Path, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                notes: str = "") -> str:
    """Write a `## title` section holding a Markdown table into `docs/benchmarks/<page>`.

    A section with the same title is replaced, others are kept, so several scripts can write
    to one page. Returns the section's text.
    """
    path = Path(page)
    if not path.is_absolute():
        path = DOCS / path
    lines = [f"## {title}", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines.append("| " + " | ".join(map(str, headers)) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    section = "\n".join(lines) + "\n"

    text = path.read_text() if path.exists() else f"# Benchmarks: {path.stem}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    return section


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


if __name__ == "__main__":  # a smoke test of the harness itself
    a = torch.randn(256, 256)
    print(f"matmul 256^3 on {device_name()}: {time_fn(lambda: a @ a):.3f} ms", file=sys.stderr)
