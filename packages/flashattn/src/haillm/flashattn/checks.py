"""Input validation shared by every impl: bad input fails early with a message that names the
argument and what was expected (shape, dtype, divisibility, device)."""

from __future__ import annotations

import os

import torch

__all__ = ["IMPLS", "TRITON_DTYPES", "TRITON_MAX_HEADDIM", "check_cu_seqlens", "check_qkv",
           "interpreting"]

# The vocabulary every haillm op shares (docs/architecture.md): "reference", "torch" (the
# optimized pure-PyTorch path, here the tiled FlashAttention-2 in PyTorch), "triton", "auto";
# "tiled" stays an alias of "torch".
IMPLS = ("auto", "reference", "torch", "tiled", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEADDIM = 256  # as FlashAttention-2
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, impl: str,
              varlen: bool = False) -> None:
    """Shapes, dtypes and devices of q, k, v.

    Batched: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_kv, headdim).
    Varlen:  q (total_q, nheads, headdim),          k/v (total_k, nheads_kv, headdim).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if varlen:
        want, layout_q, layout_kv = 3, "(total_q, nheads, headdim)", "(total_k, nheads_kv, headdim)"
    else:
        want = 4
        layout_q = "(batch, seqlen_q, nheads, headdim)"
        layout_kv = "(batch, seqlen_k, nheads_kv, headdim)"
    if q.dim() != want:
        raise ValueError(f"q must have {want} dims {layout_q}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must have {want} dims {layout_kv}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {layout_kv}, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k/v ({k.shape[0]}) must match")
    nheads, headdim = q.shape[-2], q.shape[-1]
    nheads_kv = k.shape[-2]
    if k.shape[-1] != headdim:
        raise ValueError(f"headdim of k/v ({k.shape[-1]}) must equal headdim of q ({headdim})")
    if nheads_kv < 1 or nheads % nheads_kv != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by nheads_kv ({nheads_kv})")
    if headdim < 1:
        raise ValueError(f"headdim must be >= 1, got {headdim}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got q on {q.device}, "
                         f"k on {k.device}, v on {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"q, k, v must be floating point {_FLOATS}, got {q.dtype}")
    if impl == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"impl='triton' supports dtypes {TRITON_DTYPES}, got {q.dtype}; "
                            "impl='torch' (alias 'tiled') or impl='reference' supports it")
        if headdim > TRITON_MAX_HEADDIM:
            raise ValueError(f"impl='triton' supports headdim <= {TRITON_MAX_HEADDIM}, got "
                             f"{headdim}; impl='torch' (alias 'tiled') or impl='reference' "
                             "supports it")


def check_cu_seqlens(cu: torch.Tensor, name: str, total: int, max_seqlen: int,
                     device: torch.device) -> list[int]:
    """cu_seqlens must be int32 (batch + 1,), start at 0, never decrease, end at `total`, and no
    sequence may be longer than `max_seqlen`. Returns the offsets as a Python list."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 (batch + 1,), got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (batch + 1,), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the device of q/k/v ({device}), got {cu.device}")
    offs = cu.tolist()  # one small device-to-host copy: the price of a clear error
    if offs[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offs[0]}")
    lens = [b - a for a, b in zip(offs[:-1], offs[1:])]
    if min(lens) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {offs}")
    if offs[-1] != total:
        raise ValueError(f"{name}[-1] ({offs[-1]}) must equal the number of packed tokens ({total})")
    if max(lens) > max_seqlen:
        raise ValueError(f"max_seqlen for {name} ({max_seqlen}) is smaller than the longest "
                         f"sequence ({max(lens)})")
    return offs
