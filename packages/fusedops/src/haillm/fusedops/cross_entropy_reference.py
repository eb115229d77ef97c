"""Cross-entropy with label smoothing and z-loss in plain PyTorch: the reference.

Per non-ignored row i with target t and smoothing eps (the `F.cross_entropy` definition):

    lse_i  = log sum_j exp(x_ij)
    loss_i = (1 - eps) (lse_i - x_it) + eps (lse_i - mean_j x_ij) + z * lse_i^2

The last term is the z-loss of PaLM (Chowdhery et al. 2022, section 5), which keeps the
softmax normaliser near 1. Ignored rows contribute 0; "mean" divides by the number of
non-ignored rows. This version materialises the (N, V) log-softmax (and autograd its gradient):
exactly the memory the in-place kernel avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, *,
                            ignore_index: int = -100, reduction: str = "mean",
                            label_smoothing: float = 0.0, z_loss: float = 0.0,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Differentiable cross-entropy computed in `dtype` (fp32 by default, fp64 for tests).

    Args:
        logits: (N, V) any float dtype (upcast to `dtype`).
        target: (N,) integer class indices or `ignore_index`.

    Returns:
        () for reduction "mean"/"sum", (N,) for "none"; in `dtype`.
    """
    x = logits.to(dtype)
    loss = F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        lse = torch.logsumexp(x, dim=-1)
        loss = loss + torch.where(valid, z_loss * lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()
