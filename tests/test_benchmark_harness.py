"""The benchmark harness measures what it says (timing > 0, RSS peak grows with allocation)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402


def _setup(n):
    return n


def _alloc(n):
    x = torch.ones(n, dtype=torch.uint8)  # touched, so resident
    return int(x[-1])


def test_time_fn_positive():
    a = torch.randn(64, 64)
    assert harness.time_fn(lambda: a @ a, device="cpu", min_run_time=0.05) > 0


def test_peak_memory_subprocess_sees_allocation():
    small = harness.peak_memory_subprocess(_setup, _alloc, 1 << 20)
    big = harness.peak_memory_subprocess(_setup, _alloc, 256 << 20)
    assert big > 200 << 20
    assert big > small + (150 << 20)


def test_write_table_replaces_section(tmp_path: Path):
    page = tmp_path / "x.md"
    harness.write_table(page, "A", ["x", "y"], [[1, 2]])
    harness.write_table(page, "B", ["x"], [[3]])
    harness.write_table(page, "A", ["x", "y"], [[5, 6]])
    text = page.read_text()
    assert text.count("## A") == 1 and "| 5 | 6 |" in text and "| 1 | 2 |" not in text
    assert "## B" in text
