"""The launchers of `inplace_cross_entropy` (chunked PyTorch, Triton, reference) and the
autograd Function that writes dL/dlogits over the logits (public function: `functional.py`).

`impl="torch"` (what `auto` runs on CPU): the same algorithm as the kernel in PyTorch, a chunk
of rows at a time, so the temporary memory is one chunk, not N x V. `impl="triton"`:
`kernels.py`. `impl="reference"`: `reference.cross_entropy_reference` (autograd over the
materialised fp32 log-softmax), its gradient then written over the logits like the others, so
the storage contract and the reuse protection are the same for every impl.
"""

from __future__ import annotations

import torch

from haillm.fusedops._dispatch import interpreting, next_pow2
from haillm.fusedops.cross_entropy.reference import cross_entropy_reference

CHUNK_ELEMENTS = 1 << 22  # CPU path: rows per chunk such that a chunk is ~4M elements (16 MB fp32)


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
    from haillm.fusedops.cross_entropy.kernels import cross_entropy_fwd_bwd_kernel

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
