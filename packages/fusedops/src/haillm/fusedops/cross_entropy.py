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

`impl="torch"` (what `auto` runs on CPU): the same algorithm in PyTorch, a chunk of rows at a
time, so the temporary memory is one chunk, not N x V. `impl="triton"`:
`cross_entropy_kernels`. `impl="reference"`: `cross_entropy_reference` (autograd over the
materialised fp32 log-softmax), its gradient then written over the logits like the others, so
the storage contract and the reuse protection are the same for every impl.
"""

from __future__ import annotations

import torch

from haillm.fusedops._dispatch import interpreting, next_pow2, resolve_impl
from haillm.fusedops.cross_entropy_reference import cross_entropy_reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")
CHUNK_ELEMENTS = 1 << 22  # CPU path: rows per chunk such that a chunk is ~4M elements (16 MB fp32)


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


def _rows_torch(x2d, t, n_valid, *, ignore_index, label_smoothing, z_loss, mean, write_grad):
    """PyTorch path, a chunk of rows at a time: the per-row loss; the grad over x2d if asked.

    The softmax is `exp(x - max) / sum`, not `exp(x - lse)`: `x - max` is exact in fp32 (two
    nearby floats), while `x - lse` carries the rounding of `lse`, which is ~|x| ulp(|x|) and
    becomes a relative error of every probability (130x torch's at logits ~ 400).
    """
    N, V = x2d.shape
    losses = torch.empty(N, dtype=torch.float32, device=x2d.device)
    eps = label_smoothing
    rows = max(1, CHUNK_ELEMENTS // V)
    # "mean" over no valid row: the loss is 0/0 = NaN (as F.cross_entropy) but the gradient
    # is 0, not 0 * inf: an all-padding micro-batch must not poison the weights.
    inv_n = 1.0 / n_valid.clamp(min=1.0)
    for i in range(0, N, rows):
        xc, tc = x2d[i:i + rows], t[i:i + rows]
        x = xc.float()                                   # (n, V) fp32: a copy unless fp32
        valid = tc != ignore_index
        ts = torch.where(valid, tc, 0).long().unsqueeze(1)  # (n, 1) safe indices
        x_t = x.gather(1, ts).squeeze(1)
        sum_x = x.sum(1) if eps else None
        if write_grad:
            m = x.amax(1, keepdim=True)
            p = x.sub_(m).exp_()                         # over xc if fp32: x is consumed
            s = p.sum(1, keepdim=True)
            lse = (m + s.log()).squeeze(1)
            p.div_(s)                                    # softmax
        else:
            lse = torch.logsumexp(x, dim=1)              # (n,)
        loss = lse - (1.0 - eps) * x_t
        if eps:
            loss = loss - eps * sum_x / V
        if z_loss:
            loss = loss + z_loss * lse * lse
        losses[i:i + rows] = torch.where(valid, loss, 0.0)
        if write_grad:
            if z_loss:
                p.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(1))
            if eps:
                p.sub_(eps / V)
            p.scatter_add_(1, ts, torch.full_like(ts, -(1.0 - eps), dtype=p.dtype))
            scale = valid.to(p.dtype)
            if mean:
                scale = scale * inv_n
            p.mul_(scale.unsqueeze(1))                   # ignored rows -> 0
            if p.data_ptr() != xc.data_ptr():
                xc.copy_(p)
    return losses


def _rows_triton(x2d, t, n_valid, *, ignore_index, label_smoothing, z_loss, mean, write_grad):
    from haillm.fusedops.cross_entropy_kernels import cross_entropy_fwd_bwd_kernel

    N, V = x2d.shape
    losses = torch.empty(N, dtype=torch.float32, device=x2d.device)
    if N == 0:
        return losses
    block = min(next_pow2(V), 1024 if interpreting() else 8192 // x2d.element_size())
    cross_entropy_fwd_bwd_kernel[(N,)](
        x2d, x2d.stride(0), t, losses, n_valid, V, ignore_index,
        float(label_smoothing), float(z_loss),
        MEAN=mean, WRITE_GRAD=write_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return losses


def _rows_reference(x2d, t, n_valid, *, ignore_index, label_smoothing, z_loss, mean,
                    write_grad):
    """`cross_entropy_reference` per row; its autograd gradient (of the mean, or of each row's
    loss) written over x2d. Materialises (N, V) fp32 tensors: the readable baseline."""
    del n_valid  # the reference divides by the count itself
    t = t.long()
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
    if not write_grad:
        return cross_entropy_reference(x2d, t, reduction="none", **kw).float()
    with torch.enable_grad():
        x = x2d.detach().float().requires_grad_()
        losses = cross_entropy_reference(x, t, reduction="none", **kw)
        total = cross_entropy_reference(x, t, reduction="mean", **kw) if mean else losses.sum()
        (grad,) = torch.autograd.grad(total, x)
    x2d.copy_(grad)
    return losses.detach()


_ROWS = {"torch": _rows_torch, "triton": _rows_triton, "reference": _rows_reference}


def _forward(logits, target, *, ignore_index, reduction, label_smoothing, z_loss, backend,
             write_grad, vocab=None):
    V = vocab or logits.shape[-1]
    try:
        x2d = logits.view(-1, V)                          # (N, V), same storage
    except RuntimeError as e:
        raise ValueError(f"inplace_cross_entropy: logits of shape {tuple(logits.shape)} and "
                         f"strides {logits.stride()} cannot be viewed as (N, V) rows") from e
    t = target.reshape(-1)                                # (N,)
    n_valid = (t != ignore_index).sum().to(torch.float32)  # () on the device: no host sync
    losses = _ROWS[backend](x2d, t, n_valid, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, z_loss=z_loss,
                            mean=reduction == "mean", write_grad=write_grad)
    if reduction == "none":
        return losses.view(target.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / n_valid


_LEAF_MSG = ("inplace_cross_entropy: logits is a leaf tensor that requires grad (or a view of "
             "one); its storage would be overwritten by the gradient. Pass the output of the LM "
             "head (a non-leaf), or logits.clone() when testing.")


class InplaceCrossEntropyFn(torch.autograd.Function):
    """Forward computes the loss AND writes the (pre-scaled) gradient over the logits."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, z_loss, backend,
                vocab):
        loss = _forward(logits, target, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, z_loss=z_loss, backend=backend,
                        write_grad=True, vocab=vocab)
        # The logits were overwritten: bump their version and make them our output, so that
        # (a) a node that saved them raises in its backward, (b) using them later routes a
        # gradient into our backward, which raises a clear error instead of corrupting.
        ctx.mark_dirty(logits)
        ctx.set_materialize_grads(False)  # no N x V zero gradient for the unused output
        ctx.save_for_backward(logits)
        ctx.reduction, ctx.vocab = reduction, vocab
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        if grad_logits is not None:
            raise RuntimeError(
                "inplace_cross_entropy overwrote the logits with dL/dlogits: they were used "
                "again after the loss (their values are now gradients). Compute anything else "
                "that needs the logits (accuracy, z-loss, ...) before the loss, or clone them.")
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 8
        if ctx.reduction == "none":
            # (N, V) *= (N, 1); `grad` may be the whole base of a (N, V) view (same storage)
            grad.view(-1, ctx.vocab).mul_(grad_loss.reshape(-1, 1))
        else:
            grad.mul_(grad_loss)                 # the stored gradient, scaled in place
        return grad, None, None, None, None, None, None, None


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
