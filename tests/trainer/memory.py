"""Measure what autograd keeps for backward: the planner's activation terms against reality.

`saved_bytes(chunk, x, y)`: the bytes of every distinct storage that autograd saves for
backward during one micro-batch's forward through `chunk` (`saved_tensors_hooks`; the
parameters excluded; a non-reentrant checkpoint's inputs are saved through the same hooks, its
recomputed tensors are not: they exist only during the block's backward).

Under full recomputation a block's recomputed tensors live only during its own backward
(the planner's `recompute_workspace`: one block's `none` bytes, which the `none` measurement
checks); `benchmarks/recompute.py` measures the whole peak on a GPU.
"""

from __future__ import annotations

import torch


def saved_bytes(chunk, x, y=None) -> tuple[int, torch.Tensor]:
    """(bytes saved for backward by one forward of `chunk`, its output)."""
    params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes() > 0:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunk(x, y)
    return sum(seen.values()), out
