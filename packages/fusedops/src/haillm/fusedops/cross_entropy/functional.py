"""`inplace_cross_entropy`: the loss in fp32, and dL/dlogits written over the logits.

Why: at the end of an LLM the logits are (tokens x vocab), e.g. 8192 x 128k = 1 G elements.
Eager `F.cross_entropy(logits.float(), t)` then holds the bf16 logits, their fp32 copy, the
fp32 log-softmax and, in backward, an fp32 gradient plus its bf16 cast: ~9x the logits' bytes.
The gradient of CE w.r.t. the logits only needs the logits themselves (softmax - onehot), so
we compute it in the *forward* pass and store it where the logits were: the only N x V buffer
is the one that already existed. Backward is then a mere scaling by grad_output.

The hazard: after this call the logits tensor holds the gradient. Anything that reads the
logits afterwards gets wrong numbers, and an autograd node that had saved them (e.g. a
`tanh` soft-cap) would silently compute wrong gradients. So we tell autograd: the logits are
`mark_dirty` (their version counter is bumped, so a node that saved them raises in backward)
and become an output of our node (so a later graph that uses them raises too).

The three impls (`ops.py`): "torch" (chunked PyTorch, what `auto` runs on CPU), "triton"
(`kernels.py`) and "reference" (`reference.py`); all of them write the gradient over the logits.
"""

from __future__ import annotations

import torch

from haillm.fusedops._dispatch import resolve_impl
from haillm.fusedops.cross_entropy.ops import InplaceCrossEntropyFn, _forward

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")


def _validate(logits, target, ignore_index, reduction, label_smoothing, z_loss):
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("inplace_cross_entropy: logits and target must be tensors")
    if logits.dim() < 2:
        raise ValueError(f"inplace_cross_entropy: logits must be (N, V), got shape "
                         f"{tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"inplace_cross_entropy: logits dtype must be one of {_DTYPES}, got "
                        f"{logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"inplace_cross_entropy: target must be int64 (or int32), got "
                        f"{target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"inplace_cross_entropy: target shape {tuple(target.shape)} must be "
                         f"logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    if target.device != logits.device:
        raise ValueError(f"inplace_cross_entropy: target is on {target.device}, logits on "
                         f"{logits.device}")
    if logits.stride(-1) != 1:
        raise ValueError(f"inplace_cross_entropy: logits must have stride 1 along the vocab dim "
                         f"(got strides {logits.stride()}); the gradient is written in place, so "
                         "a contiguous copy would defeat the purpose: call .contiguous() first")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"inplace_cross_entropy: reduction must be one of {_REDUCTIONS}, got "
                         f"{reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"inplace_cross_entropy: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"inplace_cross_entropy: z_loss must be >= 0, got {z_loss}")
    V = logits.shape[-1]
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bad.any():  # one host sync on CUDA: a wrong target would read out of bounds
        i = int(bad.nonzero()[0, 0]) if target.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"inplace_cross_entropy: target[{i}] = {int(target[i])} is out of range "
                         f"[0, {V}) and is not ignore_index ({ignore_index})")


_LEAF_MSG = ("inplace_cross_entropy: logits is a leaf tensor that requires grad (or a view of "
             "one); its storage would be overwritten by the gradient. Pass the output of the LM "
             "head (a non-leaf), or logits.clone() when testing.")


def inplace_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                          reduction: str = "mean", label_smoothing: float = 0.0,
                          z_loss: float = 0.0, impl: str = "auto") -> torch.Tensor:
    """Cross-entropy whose gradient overwrites the logits (no extra N x V buffer).

    Args:
        logits: (N, V) (or (..., V)) fp32/fp16/bf16, stride 1 along V. When it requires grad
            it must not be a leaf: after the call its storage holds dL/dlogits (in its dtype),
            and using it again in autograd raises. Without grad it is left untouched.
        target: (N,) (or (...,)) int64 class indices in [0, V), or `ignore_index`.
        ignore_index: target value whose rows contribute no loss and no gradient.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        label_smoothing: eps in [0, 1], as `F.cross_entropy`.
        z_loss: coefficient z of the extra z * logsumexp^2 per row (PaLM's z-loss).
        impl: "auto" (Triton on CUDA, the chunked PyTorch path on CPU), "triton", "torch"
            (the chunked PyTorch path) or "reference" (`cross_entropy_reference`, whose
            gradient is then written over the logits too). See docs/architecture.md.

    Returns:
        fp32 loss: () for "mean"/"sum", (N,) for "none".
    """
    _validate(logits, target, ignore_index, reduction, label_smoothing, z_loss)
    backend = resolve_impl(impl, logits, op="inplace_cross_entropy")
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
              z_loss=z_loss, backend=backend)
    if torch.is_grad_enabled() and logits.requires_grad:
        if logits.is_leaf:
            raise ValueError(_LEAF_MSG)
        base = logits._base
        if base is not None:
            # autograd cannot let a multi-output Function modify a *view* in place. The usual
            # view, `logits.view(-1, V)` of the LM head output, covers its whole base: we then
            # work on the base (same storage and version counter, so the protection holds).
            if not (base.is_contiguous() and logits.is_contiguous()
                    and base.numel() == logits.numel() and base.data_ptr() == logits.data_ptr()):
                raise ValueError(
                    "inplace_cross_entropy: logits is a view of part of a larger tensor (e.g. "
                    "a slice); the gradient cannot be written into it in place. Pass the whole "
                    "(..., V) tensor (shapes (..., V) are accepted) or logits.contiguous().")
            if base.is_leaf:
                raise ValueError(_LEAF_MSG)
            loss, _ = InplaceCrossEntropyFn.apply(base, target, ignore_index, reduction,
                                                  label_smoothing, z_loss, backend,
                                                  logits.shape[-1])
            return loss
        loss, _ = InplaceCrossEntropyFn.apply(logits, target, ignore_index, reduction,
                                              label_smoothing, z_loss, backend, logits.shape[-1])
        return loss
    with torch.no_grad():
        return _forward(logits, target, write_grad=False, **kw)
