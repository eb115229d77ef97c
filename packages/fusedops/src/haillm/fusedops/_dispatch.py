"""Choosing between the Triton kernels and the plain-PyTorch paths (`impl=`).

* `"auto"`: Triton on CUDA tensors, PyTorch on CPU tensors.
* `"triton"`: the kernel; on CPU it runs only under the Triton interpreter
  (`TRITON_INTERPRET=1`, which the test suite sets), otherwise we fall back *with a warning*.
* `"torch"` (alias `"reference"`): the plain-PyTorch path.
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # triton is a Linux-only dependency; everything still works without it (PyTorch paths).
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch", "reference")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, x: torch.Tensor, *, op: str) -> str:
    """Return "triton" or "torch" for an op whose main tensor is `x`."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return "torch"
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if x.is_cuda:
            if HAS_TRITON:
                return "triton"
            warnings.warn(f"{op}: triton is not installed; using the PyTorch path", stacklevel=3)
        return "torch"
    # impl == "triton"
    if not HAS_TRITON:
        warnings.warn(f"{op}: triton is not installed; falling back to PyTorch", stacklevel=3)
        return "torch"
    if not x.is_cuda and not interpreting():
        warnings.warn(
            f"{op}: impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 (set before importing "
            "haillm); falling back to PyTorch", stacklevel=3,
        )
        return "torch"
    return "triton"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs to launch for reductions with per-program partial sums."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 2
    return 4  # the interpreter runs programs one after the other: few, long programs are cheapest
