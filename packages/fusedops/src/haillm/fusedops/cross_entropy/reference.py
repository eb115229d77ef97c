"""Cross-entropy with label smoothing and z-loss in plain PyTorch: the reference.

Per non-ignored row i with target t and smoothing eps (the `F.cross_entropy` definition):

    lse_i  = log sum_j exp(x_ij)
    loss_i = (1 - eps) (lse_i - x_it) + eps (lse_i - mean_j x_ij) + z * lse_i^2

The last term is the z-loss of PaLM (Chowdhery et al. 2022, section 5), which keeps the
softmax normaliser near 1. Ignored rows contribute 0; "mean" divides by the number of
non-ignored rows; with none, the loss is NaN (0/0, as `F.cross_entropy`) and the gradient is
zero (as `F.cross_entropy`), so an all-padding micro-batch cannot poison the weights. This
version materialises the (N, V) log-softmax (and autograd its gradient):
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
    n = valid.sum()
    # 0/0 = NaN for the value, but the gradient must be 0 (not 0 * 1/0 = NaN): divide by
    # max(n, 1) and put the NaN in through where(), which sends no gradient to that branch.
    mean = loss.sum() / n.clamp(min=1)
    return torch.where(n > 0, mean, torch.full_like(mean, float("nan")))
