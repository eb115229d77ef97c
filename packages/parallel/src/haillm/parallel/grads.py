"""Gradients of parameters replicated across TP inside sequence-parallel regions.

Under sequence parallelism, LayerNorm/RMSNorm (and the row-parallel bias, if added outside the
layer) run on a *sequence shard*: each TP rank sees s/t tokens, so its weight gradient covers
only those tokens. The true gradient is the sum over the TP group (Korthikanti et al. 2022;
Megatron marks such parameters `sequence_parallel=True` and all-reduces them in
`_allreduce_layernorm_grads`). Two ways to do it here:

    mark_sequence_parallel(norm.weight, norm.bias)
    ...; loss.backward()
    allreduce_sequence_parallel_grads(model, tp_group)     # once, before the optimizer step

or hooks on the incoming gradient, *before* it is accumulated into `.grad`:
`register_sequence_parallel_grad_hooks` (so they stay right with gradient accumulation; they
fire on every backward, so with accumulation the explicit call once per step communicates less).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .comm import all_reduce, group_size

__all__ = [
    "allreduce_sequence_parallel_grads",
    "is_sequence_parallel",
    "mark_sequence_parallel",
    "register_sequence_parallel_grad_hooks",
]

_ATTR = "sequence_parallel"


def mark_sequence_parallel(*params: nn.Parameter) -> None:
    """Tag parameters that are replicated over TP but see only a sequence shard."""
    for p in params:
        setattr(p, _ATTR, True)


def is_sequence_parallel(p: torch.Tensor) -> bool:
    return bool(getattr(p, _ATTR, False))


def _params(obj: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    ps = obj.parameters() if isinstance(obj, nn.Module) else obj
    return [p for p in ps if is_sequence_parallel(p)]


def allreduce_sequence_parallel_grads(obj: nn.Module | Iterable[torch.Tensor],
                                      group: Any = None) -> int:
    """Sum over `group` the `.grad` of every marked parameter (one flat, coalesced all-reduce).

    Args:
        obj: a module (its marked parameters) or an iterable of marked parameters.
        group: the TP group.

    Returns:
        The number of gradients reduced.
    """
    grads = [p.grad for p in _params(obj) if p.grad is not None]
    if not grads or group_size(group) == 1:
        return len(grads)
    flat = torch._utils._flatten_dense_tensors(grads)
    all_reduce(flat, group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
    return len(grads)


def register_sequence_parallel_grad_hooks(obj: nn.Module | Iterable[torch.Tensor],
                                          group: Any = None) -> list[Any]:
    """All-reduce each marked parameter's incoming gradient over `group` before accumulation.

    Returns:
        The hook handles (call `.remove()` to undo).
    """
    if group_size(group) == 1:
        return []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        all_reduce(grad, group)
        return grad

    return [p.register_hook(hook) for p in _params(obj)]
