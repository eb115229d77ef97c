"""The kernels the model calls, taken from the packages and chosen once from the config.

Every operation comes from its haillm package (the contract in ARCHITECTURE.md). A switch that
turns a fused feature off selects the *same package's* reference path (plain PyTorch, unfused),
never a trainer copy: the trainer composes, it does not re-implement. `Ops.wiring` says what
runs; the trainer prints it at start-up.
"""

from __future__ import annotations

import functools

from haillm.flashattn import flash_attention
from haillm.fusedops import (
    cross_entropy_reference,
    inplace_cross_entropy,
    linear_swiglu,
    rms_norm,
    rms_norm_reference,
)
from haillm.parallel import ColumnParallelLinear, RowParallelLinear, vocab_parallel_cross_entropy
from haillm.trainer.config import ParallelConfig

__all__ = ["Ops"]


class Ops:
    """The operations of one run, chosen from the config's switches.

    Attributes:
        rms_norm: ``(x, weight, eps, *, residual=None)`` -> y or (y, x + residual).
        swiglu: ``(x (..., K), w_gate_up (2N, K))`` -> (..., N).
        cross_entropy: ``(logits (N, V), target (N,))`` -> mean fp32 loss (TP = 1).
        vocab_parallel_ce: ``(logits_shard (N, V/tp), target (N,), *, group)`` -> mean loss.
        tp_layers: ``(ColumnParallelLinear, RowParallelLinear)`` (used when tp > 1).
        wiring: ``{operation: "haillm.pkg.fn (...)"}``.
    """

    def __init__(self, p: ParallelConfig, *, warn: bool = True):  # noqa: ARG002 - kept for callers
        self.attention_impl = p.attention
        self.tp_overlap = p.tp_comm_overlap
        self.rms_norm = rms_norm if p.fused_norm else rms_norm_reference
        self.swiglu = (linear_swiglu if p.fused_swiglu
                       else functools.partial(linear_swiglu, impl="reference"))
        self.cross_entropy = inplace_cross_entropy if p.fused_cross_entropy else \
            cross_entropy_reference
        self.vocab_parallel_ce = vocab_parallel_cross_entropy
        self.tp_layers = (ColumnParallelLinear, RowParallelLinear)
        self.wiring = {
            "attention": f"haillm.flashattn.flash_attention (impl={p.attention})",
            "rms_norm": "haillm.fusedops.rms_norm (fused residual add)" if p.fused_norm
            else "haillm.fusedops.rms_norm_reference (unfused)",
            "swiglu": "haillm.fusedops.linear_swiglu" if p.fused_swiglu
            else "haillm.fusedops.linear_swiglu (impl=reference: GEMM then silu*up)",
            "cross_entropy": ("haillm.parallel.vocab_parallel_cross_entropy" if p.tp > 1 else
                              "haillm.fusedops.inplace_cross_entropy" if p.fused_cross_entropy
                              else "haillm.fusedops.cross_entropy_reference"),
        }
        if p.tp > 1:
            self.wiring["tp layers"] = (
                "haillm.parallel Column/RowParallelLinear (merged QKV, comm overlap "
                f"{'on' if p.tp_comm_overlap else 'off'}) + haillm.parallel SP/TP regions "
                "around linear_swiglu")

    def attn(self, q, k, v):
        """Causal attention: q (B, S, H, D), k/v (B, S, Hkv, D) -> (B, S, H, D)."""
        return flash_attention(q, k, v, causal=True, impl=self.attention_impl)
