"""haillm.fusedops: fused LayerNorm/RMSNorm, fused AdamW, in-place cross-entropy, fused GEMMs."""

from haillm.fusedops.adamw_reference import adamw_step_reference_
from haillm.fusedops.gemm import MergedLinear, SwiGLUMLP, linear_residual, linear_swiglu


def adamw_step_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
                param_copy=None, impl="auto"):
    """One fused AdamW step on flat fp32 buffers (see `adamw_step_reference_` for the maths).

    Placeholder dispatcher: only the PyTorch reference exists so far; the Triton kernel and
    `FusedAdamW` land with the fusedops work.
    """
    if impl not in ("auto", "reference", "torch"):
        raise ValueError(f"impl={impl!r} is not available yet; use 'reference'")
    adamw_step_reference_(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                          beta2=beta2, eps=eps, weight_decay=weight_decay, param_copy=param_copy)


__all__ = ["adamw_step_", "adamw_step_reference_"]
__all__ += ["MergedLinear", "SwiGLUMLP", "linear_residual", "linear_swiglu"]
