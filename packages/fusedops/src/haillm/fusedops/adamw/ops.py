"""`adamw_step_` (one fused AdamW pass over flat buffers) and its launcher.

The teaching version is `reference.adamw_step_reference_` (six PyTorch ops, each a full
pass over memory); the real one (`kernels.adamw_kernel`) is one pass that reads and
writes every buffer exactly once.
"""

from __future__ import annotations

import math

import torch

from haillm.fusedops._dispatch import interpreting, resolve_impl
from haillm.fusedops.adamw.reference import adamw_step_reference_

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(param, grad, exp_avg, exp_avg_sq, param_copy, step, lr, beta1, beta2, eps, wd):
    n = param.numel()
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg),
                    ("exp_avg_sq", exp_avg_sq), ("param_copy", param_copy)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"adamw_step_: {name} must be a tensor, got {type(t).__name__}")
        if t.numel() != n:
            raise ValueError(f"adamw_step_: {name} has {t.numel()} elements, expected {n} "
                             f"(the size of param)")
        if t.dtype not in _FLOATS:
            raise TypeError(f"adamw_step_: {name} dtype must be one of {_FLOATS}, got {t.dtype}")
        if t.device != param.device:
            raise ValueError(f"adamw_step_: {name} is on {t.device}, param on {param.device}")
        if not t.is_contiguous():
            raise ValueError(f"adamw_step_: {name} must be contiguous (a flat buffer)")
    if step < 1:
        raise ValueError(f"adamw_step_: step must be >= 1 (the step number after this update), "
                         f"got {step}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"adamw_step_: betas must be in [0, 1), got ({beta1}, {beta2})")
    if lr < 0 or eps < 0 or wd < 0:
        raise ValueError(f"adamw_step_: lr, eps, weight_decay must be >= 0, got {lr}, {eps}, {wd}")


def adamw_step_triton_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
                       weight_decay, param_copy=None, block: int | None = None) -> None:
    """Launch the one-pass AdamW kernel (see `adamw_step_` for the arguments)."""
    import triton

    from haillm.fusedops.adamw.kernels import adamw_kernel

    n = param.numel()
    if n == 0:
        return
    if block is None:
        block = 1024 if interpreting() else 2048
    grid = (triton.cdiv(n, block),)
    adamw_kernel[grid](
        param, grad, exp_avg, exp_avg_sq, param_copy if param_copy is not None else param,
        n,
        1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2,
        lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step), eps,
        HAS_COPY=param_copy is not None, LERP_SMALL=abs(1.0 - beta1) < 0.5, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )


@torch.no_grad()
def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, param_copy: torch.Tensor | None = None,
                impl: str = "auto") -> None:
    """One AdamW step, in place, in one fused pass over flat buffers.

    Exactly `torch.optim.AdamW`'s maths (decoupled weight decay, bias correction):
    `p <- p (1 - lr wd)`, `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
    `p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.

    Args:
        param: (N,) fp32 master parameters, updated in place.
        grad: (N,) fp32, bf16 or fp16 gradient (upcast to fp32 on the fly).
        exp_avg: (N,) fp32 first moment, updated in place.
        exp_avg_sq: (N,) fp32 second moment, updated in place.
        step: the step number *after* this update (1 for the first step).
        lr: learning rate.
        beta1: decay of the first moment.
        beta2: decay of the second moment.
        eps: added to the denominator.
        weight_decay: decoupled weight decay coefficient.
        param_copy: optional (N,) bf16/fp16 buffer that receives the new parameters in the
            same pass (the ZeRO-1 low-precision working copy).
        impl: "auto" (Triton on CUDA, PyTorch on CPU), "triton", "torch"/"reference".

    """
    _check(param, grad, exp_avg, exp_avg_sq, param_copy, step, lr, beta1, beta2, eps,
           weight_decay)
    if resolve_impl(impl, param, op="adamw_step_") == "triton":
        adamw_step_triton_(param.view(-1), grad.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1),
                           step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                           weight_decay=weight_decay,
                           param_copy=None if param_copy is None else param_copy.view(-1))
    else:
        adamw_step_reference_(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                              beta2=beta2, eps=eps, weight_decay=weight_decay,
                              param_copy=param_copy)
