"""Teaching versions: the same maths as `ZeroDataParallel` + `Zero1AdamW`, in a few lines.

* `MixedPrecisionAdamW`: ONE process, bf16/fp16 model, fp32 master weights and fp32
  accumulated gradients, `torch.optim.AdamW` on the masters. This is what ZeRO-1 must equal
  (the test oracle for the bf16 path).
* `naive_zero1_step`: ZeRO-1 without any engineering: flatten all gradients, all-reduce them,
  keep my 1/N_d slice, AdamW on that slice of the fp32 masters, all-gather the masters, copy
  into the model. The real one adds buckets overlapped with backward, reduce-scatter instead of
  all-reduce (half the traffic), flat buffers instead of copies, clipping and loss scaling.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from haillm.fusedops import adamw_step_

__all__ = ["MixedPrecisionAdamW", "naive_zero1_step"]


class MixedPrecisionAdamW:
    """Single-process mixed precision: low-precision model, fp32 masters and fp32 grads.

    Usage per iteration: for each micro-batch ``loss.backward(); opt.accumulate()``, then
    ``opt.step()``.

    Args:
        model: the (bf16/fp16/fp32) module; its parameters are overwritten by `step`.
        **adamw_kwargs: passed to `torch.optim.AdamW` (lr, betas, eps, weight_decay).
    """

    def __init__(self, model: nn.Module, **adamw_kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        self.opt = torch.optim.AdamW(self.masters, **adamw_kwargs)

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add each parameter's low-precision .grad into its fp32 master grad; free it."""
        for p, m in zip(self.params, self.masters):
            if p.grad is not None:
                m.grad += p.grad.float()
                p.grad = None

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> None:
        """AdamW on the masters (grads multiplied by `grad_scale` first), copy to the model."""
        for m in self.masters:
            m.grad.mul_(grad_scale)
        self.opt.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
            m.grad.zero_()


@torch.no_grad()
def naive_zero1_step(params: list[torch.Tensor], state: dict, *, lr: float, betas=(0.9, 0.999),
                     eps: float = 1e-8, weight_decay: float = 0.0, group=None) -> None:
    """One ZeRO-1 AdamW step, the obvious way (each rank calls it after its backward).

    Args:
        params: the model's parameters (any float dtype), with ``.grad`` set (local gradients).
        state: an empty dict on the first call; holds this rank's fp32 master/m/v slices.
        group: the data-parallel group (None: default).
    """
    n, r = dist.get_world_size(group), dist.get_rank(group)
    flat_grad = torch.cat([p.grad.float().reshape(-1) for p in params])  # (Ψ,)
    psi = flat_grad.numel()
    size = -(-psi // n)  # my slice has ceil(Ψ/N) elements; the last rank's is padded
    flat_grad = torch.nn.functional.pad(flat_grad, (0, size * n - psi))
    dist.all_reduce(flat_grad, group=group)  # a real ZeRO uses reduce-scatter: half the bytes
    my_grad = flat_grad[r * size:(r + 1) * size] / n  # average over data parallelism
    if not state:  # fp32 masters and moments: only my slice (the whole point of ZeRO-1)
        flat = torch.cat([p.detach().float().reshape(-1) for p in params])
        flat = torch.nn.functional.pad(flat, (0, size * n - psi))
        state.update(master=flat[r * size:(r + 1) * size].clone(), step=0,
                     m=torch.zeros(size), v=torch.zeros(size))
    state["step"] += 1
    adamw_step_(state["master"], my_grad, state["m"], state["v"], step=state["step"], lr=lr,
                beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                impl="reference")
    full = [torch.empty_like(state["master"]) for _ in range(n)]
    dist.all_gather(full, state["master"], group=group)  # everybody gets every slice
    flat = torch.cat(full)[:psi]
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
        p.grad = None
