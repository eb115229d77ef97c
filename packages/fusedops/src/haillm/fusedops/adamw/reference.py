"""AdamW, one step on flat buffers, in plain PyTorch: the reference for the fused kernel.

The maths is exactly `torch.optim.AdamW` (Loshchilov & Hutter, decoupled weight decay):

    param   <- param * (1 - lr * weight_decay)
    m       <- beta1 * m + (1 - beta1) * grad
    v       <- beta2 * v + (1 - beta2) * grad^2
    m_hat    = m / (1 - beta1^step)
    v_hat    = v / (1 - beta2^step)
    param   <- param - lr * m_hat / (sqrt(v_hat) + eps)
"""

from __future__ import annotations

import torch


@torch.no_grad()
def adamw_step_reference_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    param_copy: torch.Tensor | None = None,
) -> None:
    """One AdamW step, in place, on flat fp32 buffers of equal shape (N,).

    Args:
        param: (N,) fp32 master parameters, updated in place.
        grad: (N,) any float dtype (upcast to fp32).
        exp_avg: (N,) fp32 first moment, updated in place.
        exp_avg_sq: (N,) fp32 second moment, updated in place.
        step: the step number *after* this update (1 for the first step): bias correction.
        lr: learning rate.
        beta1: decay of the first moment.
        beta2: decay of the second moment.
        eps: added to the denominator.
        weight_decay: decoupled weight decay coefficient.
        param_copy: optional (N,) low-precision copy (bf16/fp16) written from the new param.
    """
    g = grad.float()
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    # Same grouping of operations as torch.optim.AdamW's single-tensor path, so fp32 results
    # agree to the last bits: denom = sqrt(v) / sqrt(bias2) + eps; param -= lr/bias1 * m/denom.
    denom = (exp_avg_sq.sqrt() / (bias2**0.5)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias1)
    if param_copy is not None:
        param_copy.copy_(param)
