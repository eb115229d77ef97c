"""Per-rank memory of model states, from the formula and from the tensors themselves."""

from __future__ import annotations

__all__ = ["memory_per_rank", "measured_bytes"]


def memory_per_rank(num_params: int, dp: int, *, param_bytes: int = 2, grad_bytes: int = 4,
                    zero: bool | None = None, shard: bool | None = None) -> dict[str, float]:
    """Bytes per rank of parameters, gradients and AdamW states (fp32 master, m, v).

    With ZeRO-1 (``shard=True``, `ZeroDataParallel`'s default) only the optimizer states are
    divided by N_d: ``2Ψ + 4Ψ + 12Ψ/N_d`` for bf16 parameters and fp32 main gradients (the
    ZeRO paper's ``2Ψ + 2Ψ + 12Ψ/N_d`` assumes 16-bit gradients). Plain data parallelism
    (``shard=False``) keeps ``2Ψ + 4Ψ + 12Ψ`` whatever N_d. fp32 parameters
    (``param_bytes=4``) are their own master weights: ``8Ψ/N_d`` (m and v), resp. ``8Ψ``.
    (Padding, < N_d·16 elements per bucket, is not counted.)

    Args:
        num_params: Ψ.
        dp: N_d.
        param_bytes: bytes per parameter (2 for bf16/fp16, 4 for fp32).
        grad_bytes: bytes per gradient element (4: fp32 main grads).
        zero: the older name of `shard` (kept); give one of the two, or both equal.
        shard: ZeRO-1 partitioning of the optimizer states (default True; False: plain DP).

    Returns:
        ``{"params", "grads", "optimizer", "total"}`` in bytes.
    """
    if dp < 1:
        raise ValueError(f"dp ({dp}) must be >= 1")
    if zero is not None and shard is not None and bool(zero) != bool(shard):
        raise ValueError(f"zero={zero} and shard={shard} disagree (they are the same flag)")
    sharded = True if zero is None and shard is None else bool(shard if shard is not None else zero)
    per_element = 8.0 if param_bytes >= 4 else 12.0  # m, v (+ the fp32 master below fp32)
    opt = per_element * num_params / (dp if sharded else 1)
    out = {"params": float(param_bytes * num_params), "grads": float(grad_bytes * num_params),
           "optimizer": opt}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def measured_bytes(model, optimizer) -> dict[str, int]:
    """Bytes actually held by a `ZeroDataParallel` model and its `Zero1AdamW` (storage sizes)."""
    def nbytes(*ts):
        return sum(t.untyped_storage().nbytes() for t in ts)
    out = {"params": nbytes(model.param_buffer), "grads": nbytes(model.main_grad),
           "optimizer": nbytes(*optimizer.state_tensors())}
    out["total"] = sum(out.values())
    return out
