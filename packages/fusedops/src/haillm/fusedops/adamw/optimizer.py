"""`FusedAdamW`: `torch.optim.AdamW` with one kernel launch per parameter group and dtype.

How it works (the "multi-tensor" idea of apex/DeepSpeed, done with flat buffers):

1. The first `step()` copies the parameters of each (param group, device, dtype) *bucket* into
   one contiguous buffer and re-points every `p.data` at its slice of it. The Adam states
   (`exp_avg`, `exp_avg_sq`) are slices of two more flat buffers. The module keeps working
   unchanged: its parameters simply live inside the flat buffer now.
2. Each step the gradients are gathered into a flat gradient buffer (and `p.grad` is re-pointed
   at it, so with `zero_grad(set_to_none=False)` backward accumulates straight into it and the
   gather becomes free), then ONE `adamw_step_` pass updates the whole bucket.
3. `state_dict()` is shaped exactly like torch's: per parameter `step` (a 0-d fp32 tensor),
   `exp_avg`, `exp_avg_sq` (shaped like the parameter). `load_state_dict()` accepts torch's
   and ours; the loaded tensors are copied back into the flat buffers on the next step.

Parameters that got no gradient this step are skipped, as torch does; a bucket whose params
have different step counts (some were skipped earlier) is updated one parameter at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from haillm.fusedops.adamw.ops import adamw_step_


@dataclass
class _Bucket:
    params: list[torch.Tensor]
    offsets: list[int]
    flat_p: torch.Tensor
    flat_m: torch.Tensor
    flat_v: torch.Tensor
    flat_g: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat[self.offsets[i]: self.offsets[i] + p.numel()].view_as(p)


def _same_slice(t: torch.Tensor | None, flat: torch.Tensor, offset: int) -> bool:
    """Is `t` the contiguous slice of `flat` starting at `offset`? (cheap: runs every step)"""
    return (t is not None and t.dtype == flat.dtype
            and t.data_ptr() == flat.data_ptr() + offset * flat.element_size()
            and t.is_contiguous())


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with one fused pass per bucket.

    Args:
        params: iterable of parameters or of param-group dicts (as for any torch optimizer).
        lr: learning rate.
        betas: (beta1, beta2) coefficients of the running averages.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay coefficient (torch's default 1e-2).
        impl: "auto" (Triton on CUDA, PyTorch on CPU), "triton", "torch".

    Note:
        The parameters' storage is moved into flat buffers on the first step (their values and
        identities are unchanged). Move the model to its device/dtype before the first step.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, impl: str = "auto"):
        if lr < 0.0:
            raise ValueError(f"FusedAdamW: invalid lr {lr} (must be >= 0)")
        if eps < 0.0:
            raise ValueError(f"FusedAdamW: invalid eps {eps} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamW: invalid betas {betas} (each must be in [0, 1))")
        if weight_decay < 0.0:
            raise ValueError(f"FusedAdamW: invalid weight_decay {weight_decay} (must be >= 0)")
        # amsgrad/maximize are recorded (False) so that torch.optim.AdamW can load our state.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False)
        super().__init__(params, defaults)
        self.impl = impl
        self._buckets: dict[tuple[int, torch.device, torch.dtype], _Bucket] = {}

    # ------------------------------------------------------------------ flat buffers
    def _build_bucket(self, params: list[torch.Tensor]) -> _Bucket:
        p0 = params[0]
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        flat_p = torch.empty(total, dtype=p0.dtype, device=p0.device)
        flat_m = torch.zeros_like(flat_p)
        flat_v = torch.zeros_like(flat_p)
        b = _Bucket(params, offsets, flat_p, flat_m, flat_v)
        for i, p in enumerate(params):
            b.view(flat_p, i).copy_(p.data)
            p.data = b.view(flat_p, i)
        return b

    def _bucket(self, key, params: list[torch.Tensor]) -> _Bucket:
        b = self._buckets.get(key)
        if (b is None or len(b.params) != len(params)
                or any(p is not q for p, q in zip(b.params, params))
                or not all(_same_slice(p, b.flat_p, o) for p, o in zip(params, b.offsets))):
            b = self._buckets[key] = self._build_bucket(params)
        # States loaded by load_state_dict (or never created) are (re)bound to the flat slices.
        for i, p in enumerate(params):
            st = self.state.get(p)
            if not st:
                continue
            for name, flat in (("exp_avg", b.flat_m), ("exp_avg_sq", b.flat_v)):
                if not _same_slice(st.get(name), flat, b.offsets[i]):
                    view = b.view(flat, i)
                    if name in st:
                        view.copy_(st[name])
                    else:
                        view.zero_()
                    st[name] = view
        return b

    def _flat_grad(self, b: _Bucket) -> torch.Tensor:
        """A flat gradient buffer for the bucket; gathers the grads only when needed."""
        gdtype = b.params[0].grad.dtype
        if any(p.grad.dtype != gdtype for p in b.params):
            gdtype = b.flat_p.dtype
        flat_g = b.flat_g.get(gdtype)
        if flat_g is None:
            flat_g = b.flat_g[gdtype] = torch.empty(b.flat_p.numel(), dtype=gdtype,
                                                    device=b.flat_p.device)
        if not all(_same_slice(p.grad, flat_g, o) for p, o in zip(b.params, b.offsets)):
            torch.cat([p.grad.reshape(-1).to(gdtype) for p in b.params], out=flat_g)
            for i, p in enumerate(b.params):  # later backwards may accumulate in place here
                p.grad = b.view(flat_g, i)
        return flat_g

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; `closure` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            by_key: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                by_key[(p.device, p.dtype)].append(p)
            for (device, dtype), params in by_key.items():
                if not any(p.grad is not None for p in params):
                    continue
                for p in params:
                    if p.grad is not None and p.grad.is_sparse:
                        raise RuntimeError("FusedAdamW does not support sparse gradients")
                self._step_bucket(group, self._bucket((gi, device, dtype), params))
        return loss

    def _step_bucket(self, group: dict, b: _Bucket) -> None:
        beta1, beta2 = group["betas"]
        hp = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"], impl=self.impl)
        for i, p in enumerate(b.params):
            if p.grad is not None and not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=b.view(b.flat_m, i),
                                     exp_avg_sq=b.view(b.flat_v, i))
        steps = {float(self.state[p]["step"]) for p in b.params if p.grad is not None}
        if len(steps) == 1 and all(p.grad is not None for p in b.params):
            # The fast path: the whole bucket in one launch.
            for p in b.params:
                self.state[p]["step"] += 1
            step = int(steps.pop()) + 1
            adamw_step_(b.flat_p, self._flat_grad(b), b.flat_m, b.flat_v, step=step, **hp)
            return
        for i, p in enumerate(b.params):  # mixed step counts / missing grads: per parameter
            if p.grad is None:
                continue
            st = self.state[p]
            st["step"] += 1
            adamw_step_(b.view(b.flat_p, i), p.grad.contiguous(), st["exp_avg"],
                        st["exp_avg_sq"], step=int(st["step"]), **hp)

    def load_state_dict(self, state_dict):
        """Load torch.optim.AdamW's or FusedAdamW's state (copied into the flat buffers lazily)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            # torch hands 'step' over *by reference* (and maybe on the param's device): take our
            # own CPU copy, since the step counter is incremented in place.
            if "step" in st and isinstance(st["step"], torch.Tensor):
                st["step"] = st["step"].detach().to("cpu", torch.float32, copy=True)
            elif "step" in st:
                st["step"] = torch.tensor(float(st["step"]))
            for name in ("exp_avg", "exp_avg_sq"):  # shared too: own them before the next step
                if name in st:
                    st[name] = st[name].detach().clone()
