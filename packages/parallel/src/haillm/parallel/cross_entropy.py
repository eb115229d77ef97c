"""Cross-entropy over logits split by vocabulary, without ever gathering the logits.

With an output layer that is column-parallel over the vocabulary, rank r holds logits
z[:, r·V/t:(r+1)·V/t]. Gathering (N, V) logits would cost N·V memory per rank; instead
(Megatron's `_VocabParallelCrossEntropy`, Shoeybi et al. 2019 section 3):

1. m = max over the vocabulary: local max, then an all-reduce(MAX)   (numerical stability)
2. the target's logit z_y: the rank that owns y reads it, the others contribute 0
3. Σ exp(z - m): local sums; steps 2 and 3 share ONE all-reduce(SUM) of a (2, N) tensor
4. loss = log Σ exp(z - m) - (z_y - m)

Backward: dL/dz = softmax(z) - onehot(y), computed from the saved exp and sum, on each rank's
own slice, in fp32, cast to the logits' dtype. Communication: N + 2N floats per step, no V.
"""

from __future__ import annotations

from typing import Any

import torch

from .comm import all_reduce, group_rank

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        n_local = logits.shape[-1]
        start = group_rank(group) * n_local
        z = logits.float().reshape(-1, n_local)  # (N, V/t) in fp32
        y = target.reshape(-1)  # (N,)
        m = z.max(dim=-1).values  # (N,)
        all_reduce(m, group, op=torch.distributed.ReduceOp.MAX)
        exp = torch.exp(z - m.unsqueeze(-1))  # (N, V/t)
        ours = (y >= start) & (y < start + n_local)
        local_y = (y - start).masked_fill(~ours, 0)
        z_y = z.gather(1, local_y.unsqueeze(1)).squeeze(1) - m
        stats = torch.stack([exp.sum(-1), z_y.masked_fill(~ours, 0.0)])  # (2, N)
        all_reduce(stats, group)  # one collective for Σexp and the target logit
        sum_exp, z_y = stats[0], stats[1]
        valid = y != ignore_index
        loss = (torch.log(sum_exp) - z_y).masked_fill(~valid, 0.0)  # (N,)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local_y, ours, valid)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_y, ours, valid = ctx.saved_tensors
        g = softmax  # saved for this backward only: update in place
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows[ours], local_y[ours]] -= 1.0
        # ignored tokens get no gradient (where, not *: with every token ignored the mean's
        # incoming gradient is 1/0 = inf, and torch still returns zeros there)
        scale = torch.where(valid, grad_loss.reshape(-1).float(), 0.0)
        g.mul_(scale.unsqueeze(-1))
        return g.to(ctx.dtype).view(ctx.shape), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, *,
                                 group: Any = None, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy` of logits split by vocabulary over the TP group.

    Args:
        logits_shard: (..., V/t) this rank's vocabulary slice (rank r: classes r·V/t ...),
            any float dtype; computed in fp32.
        target: (...) int64 class ids in [0, V) or `ignore_index`, identical on every TP rank.
        group: TP process group.
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: "mean" (over non-ignored tokens, as `F.cross_entropy`), "sum" or "none".

    Returns:
        fp32 loss: a scalar, or (...) for `reduction="none"`.
    """
    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits_shard shape "
                         f"without the vocabulary dim {tuple(logits_shard.shape[:-1])}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    loss = _VocabParallelCrossEntropy.apply(logits_shard, target, group, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()
