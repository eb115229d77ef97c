"""Choosing an implementation (`impl=`), interpreter detection and autocast: one place for
every op of `haillm.fusedops`.

The vocabulary and the policy (the same for every haillm op, see docs/architecture.md):

* `"reference"`: the plain, readable PyTorch version (`*_reference` functions), what the
  tests compare against;
* `"torch"`: the optimized pure-PyTorch path (e.g. the chunked in-place cross-entropy). Where
  an op has no separate one (norms, AdamW, the GEMMs), it is the reference;
* `"triton"`: the kernel, on CUDA tensors, or on CPU under the Triton interpreter
  (`TRITON_INTERPRET=1`, which the test suite sets);
* `"auto"`: Triton on CUDA tensors, `"torch"` on CPU. When the kernel cannot run on a CUDA
  input (triton missing, unsupported dtype) it falls back to `"torch"` **with a warning**.

An explicit choice is never silently replaced: `impl="triton"` that cannot run raises an error
that says why and which impls can run the call.
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

IMPLS = ("auto", "reference", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype `torch.autocast` casts matmul operands to on `device_type`, or None when off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device_type argument
        enabled = device_type == "cuda" and torch.is_autocast_enabled()
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else \
        torch.get_autocast_cpu_dtype()  # pragma: no cover - torch < 2.4


def autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inside `torch.autocast`, cast GEMM operands to the autocast dtype, as nn.Linear does."""
    dt = autocast_dtype(tensors[0].device.type)
    return tensors if dt is None else tuple(t.to(dt) for t in tensors)


def triton_problem(x: torch.Tensor, dtypes=KERNEL_DTYPES) -> str:
    """Why the Triton kernel cannot take `x` here ("" when it can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if not x.is_cuda and not interpreting():
        return (f"the tensor is on {x.device}: Triton needs a CUDA tensor (or TRITON_INTERPRET=1 "
                "set before importing haillm, to run the kernel in the CPU interpreter)")
    if x.dtype not in dtypes:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        return f"the kernel supports dtypes {', '.join(map(name, dtypes))}, not {name(x.dtype)}"
    return ""


def resolve_impl(impl: str, x: torch.Tensor, *, op: str, dtypes=KERNEL_DTYPES) -> str:
    """Return "reference", "torch" or "triton" for an op whose main tensor is `x`.

    Raises:
        ValueError: `impl` is not one of `IMPLS`, or "triton" cannot run here (TypeError when
            the dtype is the reason); the message names the impls that can.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("reference", "torch"):
        return impl
    if impl == "auto" and not x.is_cuda:
        return "torch"
    problem = triton_problem(x, dtypes)
    if not problem:
        return "triton"
    if impl == "triton":
        exc = TypeError if "dtypes" in problem else ValueError
        raise exc(f"{op}: impl='triton' cannot run: {problem}; impl='torch' or impl='reference' "
                  "run on any device and dtype")
    warnings.warn(f"{op}: impl='auto' falls back to impl='torch': {problem}", stacklevel=3)
    return "torch"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs to launch for reductions with per-program partial sums."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 2
    return 4  # the interpreter runs programs one after the other: few, long programs are cheapest
