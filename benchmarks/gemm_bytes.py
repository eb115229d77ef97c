"""Bytes moved by the SwiGLU MLP, fused vs unfused (counted, CPU-only, runs in seconds).

    python benchmarks/gemm_bytes.py        # writes a table into docs/benchmarks/fusedops-gemm.md

How we count (the compulsory-traffic model): every kernel reads each of its input tensors once
from memory and writes each output once; views (transpose, chunk) move nothing. Real GEMMs
re-read tiles of x and W, but they do so equally in both versions, so the *difference* below is
what the fusion saves.

* The unfused (PyTorch) side is **measured by running it**: a `TorchDispatchMode` sees every
  aten op that autograd and the model code execute, on "meta" tensors (shapes only, no
  arithmetic, so the 7B shapes cost nothing), and adds up the bytes of its operands.
* The fused side runs our Triton kernels, which a dispatch mode cannot see: their traffic is
  their signature (forward: read x, w_gate_up, write y; backward kernel: read x, w_gate_up,
  dy, write dh; GEMM + residual: read x, W, residual, write y). The backward's two torch
  matmuls (dx = dh @ W, dW = dh.T @ x) are counted by the dispatch mode like the unfused side.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from harness import write_table  # noqa: E402

HIDDEN, INTER = 4096, 11008  # LLaMA-7B / DeepSeek-7B MLP
DTYPE = torch.bfloat16
GB = 1e9


class ByteCounter(TorchDispatchMode):
    """Adds up input + output bytes of every non-view aten op executed under it."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable or getattr(func, "is_view", False) or \
                func.overloadpacket in (torch.ops.aten.detach, torch.ops.aten.t,
                                        torch.ops.aten.split, torch.ops.aten.chunk):
            return out  # views/aliases move no bytes
        flat = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in flat)
        self.ops.append(str(func.overloadpacket.__name__))
        return out


def nbytes(*shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=DTYPE).element_size()


def unfused(m: int):
    """Counted bytes of the PyTorch MLP: forward, and forward + backward; saved activations."""
    kw = dict(device="meta", dtype=DTYPE)
    x = torch.empty(m, HIDDEN, **kw, requires_grad=True)
    wg, wu = (torch.empty(INTER, HIDDEN, **kw, requires_grad=True) for _ in range(2))
    wd = torch.empty(HIDDEN, INTER, **kw, requires_grad=True)
    res = torch.empty(m, HIDDEN, **kw, requires_grad=True)
    dy = torch.empty(m, HIDDEN, **kw)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with ByteCounter() as fwd:
            h = F.silu(x @ wg.t()) * (x @ wu.t())  # (m, INTER)
            out = h @ wd.t() + res
    # activations held for the backward beyond the layer input x and the weights
    inputs = (x, wg, wu, wd, res)
    keep = {id(t): t for t in saved
            if not any((t._base if t._base is not None else t) is p for p in inputs)}
    act = sum(t.numel() * t.element_size() for t in keep.values())
    with ByteCounter() as bwd:
        torch.autograd.grad(out, (x, wg, wu, wd, res), dy)
    return fwd.bytes, fwd.bytes + bwd.bytes, act


def fused(m: int):
    """Bytes of the fused MLP: kernel signatures + the backward's torch matmuls (counted)."""
    x, w2, y = nbytes(m, HIDDEN), nbytes(2 * INTER, HIDDEN), nbytes(m, INTER)
    wd, r, out = nbytes(HIDDEN, INTER), nbytes(m, HIDDEN), nbytes(m, HIDDEN)
    fwd = (x + w2 + y) + (y + wd + r + out)  # linear_swiglu + linear_residual kernels
    kw = dict(device="meta", dtype=DTYPE)
    with ByteCounter() as bwd:  # what the autograd Functions run in torch
        dh = torch.empty(m, 2 * INTER, **kw)
        xx, ww = torch.empty(m, HIDDEN, **kw), torch.empty(2 * INTER, HIDDEN, **kw)
        d_out = torch.empty(m, HIDDEN, **kw)
        hh, wdd = torch.empty(m, INTER, **kw), torch.empty(HIDDEN, INTER, **kw)
        d_out @ wdd, d_out.t() @ hh  # linear_residual backward: dh_in, dWd (dres = dout)
        dh @ ww, dh.t() @ xx  # linear_swiglu backward GEMMs: dx, dW_gate_up
    # + the recomputing backward kernel: read x, w_gate_up, dy, write dh (M, 2N); and the
    # residual forward output is recomputed by nobody: the backward needs only h (= y above),
    # which linear_residual saved -- h is the one activation the fused MLP keeps.
    bwd_kernel = x + w2 + y + nbytes(m, 2 * INTER)
    return fwd, fwd + bwd.bytes + bwd_kernel, y


def main():
    rows = []
    for m in (4096, 8192, 16384):
        uf, ufb, ua = unfused(m)
        f, fb, fa = fused(m)
        rows.append([m, f"{uf / GB:.2f}", f"{f / GB:.2f}", f"{uf / f:.2f}x",
                     f"{ufb / GB:.2f}", f"{fb / GB:.2f}", f"{ufb / fb:.2f}x",
                     f"{ua / 2**20:.0f}", f"{fa / 2**20:.0f}"])
    notes = (
        f"LLaMA/DeepSeek-7B MLP (hidden {HIDDEN}, intermediate {INTER}), bf16, "
        "`down(silu(x Wg^T) * (x Wu^T)) + residual`. Unfused = PyTorch as written (two GEMMs, "
        "silu, mul, GEMM, add; bytes counted by running it under a dispatch mode on meta "
        "tensors); fused = `linear_swiglu` + `linear_residual` (kernel signatures + the "
        "backward's torch matmuls). *Saved* = activations kept for the backward besides the "
        "MLP input and the weights (unfused: gate, up, silu(gate) and h; fused: h only). "
        "The price: the fused backward recomputes gate and up, one more GEMM of 4·M·N·K "
        "FLOPs on top of the MLP's 6·M·N·K forward + 12·M·N·K backward (+22%). "
        "Produced by `benchmarks/gemm_bytes.py`."
    )
    print(write_table("fusedops-gemm.md", "Bytes moved: SwiGLU MLP, fused vs unfused (counted)",
                      ["tokens M", "fwd unfused GB", "fwd fused GB", "fwd saving",
                       "fwd+bwd unfused GB", "fwd+bwd fused GB", "fwd+bwd saving",
                       "saved act. unfused MiB", "saved act. fused MiB"], rows, notes))


if __name__ == "__main__":
    main()
