"""Merged projections: one GEMM for several outputs (Q, K, V; gate and up), TP-sliceable.

"Fuse GEMMs whenever possible" (DeepSeek LLM, sec. 2.4): the attention's Q, K and V
projections read the same x, and so do the MLP's gate and up projections. Concatenating their
weights along the output dim turns 3 (or 2) GEMMs into one, which reads x once, launches once
and runs a larger, more efficient GEMM. With GQA the parts have *unequal* widths
(Q: n_heads * d, K and V: n_kv_heads * d), so `MergedLinear` keeps the list of widths and
`split` cuts the merged output back into its parts.

Tensor parallelism (Megatron-style column parallel): rank r of t must hold rows
``[r*o/t, (r+1)*o/t)`` of *every* part, not a contiguous 1/t of the concatenated weight
(which would give rank 0 all of Q and rank 1 all of K and V). `from_separate(...,
tp_rank=r, tp_size=t)` / `shard(r, t)` chunk each part and re-concatenate, so the local
output is ``[Q_r, K_r, V_r]`` and the split after the GEMM stays local. The communication
(identity forward / all-reduce of dx backward) belongs to the caller (`haillm.parallel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from haillm.fusedops.gemm.functional import linear_residual, linear_swiglu

__all__ = ["MergedLinear", "SwiGLUMLP"]


class MergedLinear(nn.Module):
    """One nn.Linear-style GEMM producing several outputs of (possibly) unequal widths.

    ``weight`` is ``cat([W_0, W_1, ...])`` of shape (sum(out_features), in_features); the
    forward returns the merged output and `split` returns the parts.

    Args:
        in_features: K.
        out_features: widths of the parts on *this* rank, e.g. ``(q_dim, kv_dim, kv_dim)``.
        bias: whether the merged layer has a bias (sum(out_features),).
        tp_rank: this rank's index in the tensor-parallel group (bookkeeping only).
        tp_size: tensor-parallel degree the widths were divided by (1: not sharded).
        device: as for nn.Linear.
        dtype: as for nn.Linear.
    """

    def __init__(self, in_features: int, out_features: Sequence[int], bias: bool = False, *,
                 tp_rank: int = 0, tp_size: int = 1, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        out_features = tuple(int(o) for o in out_features)
        if not out_features or any(o <= 0 for o in out_features):
            raise ValueError(f"out_features must be positive widths, got {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(sum(out_features), in_features, **kw))
        self.bias = nn.Parameter(torch.empty(sum(out_features), **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same init as one nn.Linear per part (kaiming-uniform on fan_in = in_features).
        bound = 1.0 / self.in_features**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., sum(out_features)): one GEMM for all parts."""
        return F.linear(x, self.weight, self.bias)

    def split(self, out: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, ...]:
        """Cut a merged tensor into its parts along ``dim`` (views, no copy).

        Args:
            out: (..., sum(out_features)) merged output; or, with ``dim=0``, the weight
                (sum(out_features), K) or bias.
            dim: the merged dimension.

        Returns:
            One tensor per part, (..., out_features[i]).
        """
        if out.shape[dim] != sum(self.out_features):
            raise ValueError(f"expected dim {dim} of size {sum(self.out_features)} (= sum of "
                             f"{self.out_features}), got {out.shape[dim]}")
        return torch.split(out, self.out_features, dim=dim)

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``split(forward(x))``: the parts, each (..., out_features[i])."""
        return self.split(self(x))

    @staticmethod
    def _slice_part(t: torch.Tensor, rank: int, size: int, i: int) -> torch.Tensor:
        if t.shape[0] % size != 0:
            raise ValueError(f"part {i} has {t.shape[0]} output rows, which must be divisible "
                             f"by tp_size ({size}) to shard it column-parallel")
        return t.chunk(size, dim=0)[rank]

    @classmethod
    def from_separate(cls, linears: Sequence[nn.Linear], *, tp_rank: int = 0,
                      tp_size: int = 1) -> MergedLinear:
        """Merge separate nn.Linear layers that read the same input into one GEMM.

        Args:
            linears: layers with equal in_features, dtype and device; all with a bias or all
                without.
            tp_rank: rank in the tensor-parallel group (0 <= tp_rank < tp_size).
            tp_size: TP degree; each part's out_features must be divisible by it. The result
                holds rows ``chunk(tp_size)[tp_rank]`` of every part.

        Returns:
            A `MergedLinear` with out_features ``[l.out_features // tp_size for l in linears]``
            whose weights are copies (not views) of the given ones.
        """
        linears = list(linears)
        if not linears:
            raise ValueError("from_separate needs at least one nn.Linear")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank ({tp_rank}) must be in [0, tp_size={tp_size})")
        k = linears[0].in_features
        for i, lin in enumerate(linears):
            if lin.in_features != k:
                raise ValueError(f"linears[{i}].in_features ({lin.in_features}) != "
                                 f"linears[0].in_features ({k}): merged layers read one input")
            if lin.weight.dtype != linears[0].weight.dtype or \
                    lin.weight.device != linears[0].weight.device:
                raise ValueError(f"linears[{i}] dtype/device differs from linears[0]")
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError(f"either all linears have a bias or none does, got {has_bias}")
        w0 = linears[0].weight
        merged = cls(k, [lin.out_features // tp_size for lin in linears], bias=all(has_bias),
                     tp_rank=tp_rank, tp_size=tp_size, device=w0.device, dtype=w0.dtype)
        with torch.no_grad():
            # (sum_i o_i / t, K): rank r's rows of every part, concatenated part by part
            merged.weight.copy_(torch.cat([
                cls._slice_part(lin.weight, tp_rank, tp_size, i) for i, lin in enumerate(linears)
            ]))
            if merged.bias is not None:
                merged.bias.copy_(torch.cat([
                    cls._slice_part(lin.bias, tp_rank, tp_size, i)
                    for i, lin in enumerate(linears)
                ]))
        return merged

    def shard(self, tp_rank: int, tp_size: int) -> MergedLinear:
        """This (unsharded) layer's column-parallel slice for rank ``tp_rank`` of ``tp_size``."""
        if self.tp_size != 1:
            raise ValueError("shard() expects an unsharded MergedLinear (tp_size == 1)")
        parts = self.split(self.weight, dim=0)  # (o_i, K) each
        biases = self.split(self.bias, dim=0) if self.bias is not None else [None] * len(parts)
        linears = []
        for w, b in zip(parts, biases):
            lin = nn.Linear(self.in_features, w.shape[0], bias=b is not None,
                            device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            linears.append(lin)
        return MergedLinear.from_separate(linears, tp_rank=tp_rank, tp_size=tp_size)

    def extra_repr(self) -> str:
        tp = f", tp_rank={self.tp_rank}, tp_size={self.tp_size}" if self.tp_size > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{tp}")


class SwiGLUMLP(nn.Module):
    """LLaMA/DeepSeek MLP ``down(silu(gate(x)) * up(x))`` on the fused GEMMs.

    ``gate_up`` is a `MergedLinear` with two equal parts (no bias), so its weight is exactly
    the ``w_gate_up`` layout of `linear_swiglu`; the down projection adds the residual in its
    epilogue when one is given (`linear_residual`). Under TP the sharded gate_up weight
    ``cat([W_gate_r, W_up_r])`` is still that layout, so the fused kernel runs per rank.

    Args:
        hidden_size: model width (K of gate/up, N of down).
        intermediate_size: MLP width (per rank when sharded).
        impl: passed to `linear_swiglu` / `linear_residual`.
        device: as for nn.Linear.
        dtype: as for nn.Linear.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, *, impl: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.impl = impl
        self.gate_up = MergedLinear(hidden_size, (intermediate_size, intermediate_size),
                                    device=device, dtype=dtype)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False, device=device,
                              dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., hidden) -> (..., hidden); adds ``residual`` (..., hidden) if given."""
        h = linear_swiglu(x, self.gate_up.weight, impl=self.impl)  # (..., intermediate)
        if residual is None:
            return F.linear(h, self.down.weight)
        return linear_residual(h, self.down.weight, residual, impl=self.impl)

    @classmethod
    def from_separate(cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear, *,
                      impl: str = "auto") -> SwiGLUMLP:
        """Build from three bias-free nn.Linear layers (gate, up: hidden -> inter; down)."""
        if any(lin.bias is not None for lin in (gate, up, down)):
            raise ValueError("SwiGLUMLP has no biases: gate, up and down must have bias=False")
        w = gate.weight
        mlp = cls(gate.in_features, gate.out_features, impl=impl, device=w.device,
                  dtype=w.dtype)
        with torch.no_grad():
            mlp.gate_up.weight.copy_(MergedLinear.from_separate([gate, up]).weight)
            if tuple(down.weight.shape) != tuple(mlp.down.weight.shape):
                raise ValueError(f"down.weight must have shape {tuple(mlp.down.weight.shape)}, "
                                 f"got {tuple(down.weight.shape)}")
            mlp.down.weight.copy_(down.weight)
        return mlp
