"""Zero1AdamW: AdamW whose fp32 master weights and moments are sharded over data parallelism.

Per rank, for Ψ parameters and N_d data-parallel ranks (bytes):

    bf16 parameters          2Ψ       (full copy: forward and backward need them)
    fp32 main gradients      4Ψ       (full buffer: every rank accumulates all gradients)
    fp32 master + m + v     12Ψ/N_d   (ZeRO-1: only this rank's shard)

With fp32 parameters (`precision="fp32"`) the parameters *are* the master weights: the shard is
updated in place in the flat parameter buffer and the optimizer holds only m and v, 8Ψ/N_d
(as torch's `ZeroRedundancyOptimizer` around `torch.optim.AdamW`).

On a ``ZeroDataParallel(shard=False)`` model (plain data parallelism) the "shard" is the whole
buffer: 12Ψ (fp32 parameters: 8Ψ) on every rank, every rank updates every element of identical
all-reduced gradients, and step 6 below has nothing to gather.

`step()`:
1. wait for the gradient reduce-scatter or all-reduce (`ZeroDataParallel.finish_grad_sync`);
2. one all-reduce of ``[Σg², non-finite count]`` in float64 over DP (sharded only: unsharded,
   every rank already holds all of Σg²) and over the extra model-parallel groups: the global
   gradient norm and "found inf" agree on every rank;
3. skip the step if a gradient is inf/nan (fp16: and back the loss scale off);
4. scale the shard by ``1/S · min(1, max_norm/‖g‖)`` (unscale and clip in one pass);
5. the fused AdamW (`haillm.fusedops.adamw_step_`) on the shard, writing the new low-precision
   parameters into the flat parameter buffer in the same pass;
6. all-gather the parameter buckets (sharded only).

The teaching version is `haillm.zero.reference.naive_zero1_step`; this one adds buckets, flat
buffers, padding, clipping, loss scaling, per-group hyper-parameters and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from haillm.fusedops import adamw_step_
from haillm.zero.comm import all_gather_async, group_size
from haillm.zero.data_parallel import ZeroDataParallel
from haillm.zero.loss_scaler import DynamicLossScaler

__all__ = ["StepResult", "Zero1AdamW", "weight_decay_groups"]

_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Elements per float64 temporary of the gradient norm (32 MiB): bounds the memory of the
# upcast whatever the size of a parameter (an embedding may be a bucket of its own).
_NORM_PIECE = 1 << 22


def _sum_of_squares_fp64(g: torch.Tensor) -> torch.Tensor:
    """Σ g_i² of a flat (n,) gradient view, accumulated in float64; returns a 0-d fp64 tensor.

    The square of an fp32 (or bf16/fp16) number is exact in float64 (24 + 24 bits < 53), so the
    only rounding is the float64 sum: at most (n-1)·2^-53 relative, whatever order the shards,
    runs and ranks add up in. An fp32 accumulator is off by up to ~1e-7 relative and by a
    different amount per sharding.
    """
    acc = torch.zeros((), dtype=torch.float64, device=g.device)
    for piece in g.reshape(-1).split(_NORM_PIECE):
        p = piece.to(torch.float64)
        acc += torch.dot(p, p)
    return acc


class StepResult(NamedTuple):
    """What `Zero1AdamW.step` returns: the global gradient norm (unscaled, before clipping;
    inf/nan when the step was skipped) and whether the step was skipped."""

    grad_norm: float
    skipped: bool


def weight_decay_groups(module: nn.Module, weight_decay: float, *,
                        no_decay: Callable[[str, nn.Parameter], bool] | None = None
                        ) -> list[dict]:
    """Two parameter groups: with `weight_decay`, and without it for norms and biases.

    Args:
        module: the model (or a `ZeroDataParallel`).
        weight_decay: the decay of the first group.
        no_decay: predicate ``(name, param) -> bool``; default: 1-D parameters (biases, norm
            weights) and names containing ``"norm"`` or ending in ``"bias"``.

    Returns:
        ``[{"params": [...], "weight_decay": wd}, {"params": [...], "weight_decay": 0.0}]``
        (empty groups dropped), for `Zero1AdamW(param_groups=...)` or any torch optimizer.
    """
    if no_decay is None:
        def no_decay(name: str, p: nn.Parameter) -> bool:
            return p.ndim < 2 or "norm" in name.lower() or name.endswith("bias")
    decay, plain = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Zero1AdamW(torch.optim.Optimizer):
    """AdamW with fp32 master weights and moments sharded over the DP group (ZeRO stage 1).

    With a ``ZeroDataParallel(shard=False)`` model the same class is plain data-parallel AdamW:
    the full fp32 state on every rank (``layout.shard_numel`` = the whole buffer), every
    element updated from the all-reduced gradients, no parameter all-gather. The checkpoint
    formats are the same in both modes (`full_state_dict` loads across modes and DP sizes).

    Args:
        model: the `ZeroDataParallel`-wrapped model (sharded or not).
        lr, betas, eps, weight_decay: exactly `torch.optim.AdamW`'s (defaults of each group).
        dp_group: must be the model's DP group (default: the model's).
        precision: ``"bf16"``, ``"fp16"`` or ``"fp32"``: the dtype of the model's parameters
            (checked). ``"fp16"`` creates a `DynamicLossScaler` unless `loss_scaler` is given.
        param_groups: torch-style groups (``{"params": [...], "lr": ..., "weight_decay": ...}``)
            over the model's parameters, e.g. from `weight_decay_groups`; default: one group.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        model_parallel_groups: extra groups (TP, PP) over which Σg² and the found-inf flag are
            also summed, so every rank sees the global norm.
        count_in_norm: predicate ``(name, param) -> bool``: whether this rank adds the
            parameter to Σg². Return False on TP ranks > 0 for parameters replicated across TP
            (norm weights), so they are not counted tp times. Default: all.
        loss_scaler: a `DynamicLossScaler` (fp16; None for bf16/fp32).
        skip_nonfinite: skip the step when a gradient is inf/nan even without a loss scaler.
        impl: passed to `haillm.fusedops.adamw_step_`.
    """

    def __init__(self, model: ZeroDataParallel, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, dp_group=None,
                 precision: str = "bf16", param_groups: Sequence[dict] | None = None,
                 max_grad_norm: float | None = None,
                 model_parallel_groups: Sequence = (),
                 count_in_norm: Callable[[str, nn.Parameter], bool] | None = None,
                 loss_scaler: DynamicLossScaler | None = None, skip_nonfinite: bool = True,
                 impl: str = "auto"):
        if not isinstance(model, ZeroDataParallel):
            raise TypeError("Zero1AdamW needs the model wrapped in ZeroDataParallel(module, "
                            f"dp_group=...), got {type(model).__name__}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        if model.param_dtype != _PRECISIONS[precision]:
            raise ValueError(f"precision={precision!r} expects {_PRECISIONS[precision]} parameters "
                             f"but the model's are {model.param_dtype}: cast the module before "
                             "wrapping it")
        if dp_group is not None and dp_group is not model.dp_group:
            raise ValueError("dp_group differs from the ZeroDataParallel model's dp_group")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm ({max_grad_norm}) must be > 0 or None")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = list(param_groups) if param_groups is not None else [{"params": model.params}]
        self.model = None
        super().__init__(groups, defaults)
        self.model = model
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.model_parallel_groups = list(model_parallel_groups)
        self.skip_nonfinite = skip_nonfinite
        self.impl = impl
        if loss_scaler is None and precision == "fp16":
            loss_scaler = DynamicLossScaler()
        self.loss_scaler = loss_scaler
        self.num_steps = 0  # applied (not skipped) steps: AdamW's bias-correction counter

        index = {id(p): i for i, p in enumerate(model.params)}
        group_of = [-1] * len(model.params)
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in index:
                    raise ValueError("param_groups hold a tensor that is not a trainable "
                                     "parameter of the model")
                if group_of[index[id(p)]] != -1:
                    raise ValueError("a parameter appears in two param_groups")
                group_of[index[id(p)]] = g
        missing = [model.param_names[i] for i, g in enumerate(group_of) if g == -1]
        if missing:
            raise ValueError(f"param_groups miss parameters {missing[:5]}")
        counted = [True if count_in_norm is None else bool(count_in_norm(n, p))
                   for n, p in zip(model.param_names, model.params)]

        # This rank's shard: fp32 master weights and the two moments, one flat buffer each
        # (unsharded: the layout has one shard, so these are the full buffers).
        # fp32 parameters are their own master weights: no copy (8 B per owned element).
        L = model.layout
        dev = model.device
        self.separate_master = precision != "fp32"
        self._master = (torch.zeros(L.shard_numel, dtype=torch.float32, device=dev)
                        if self.separate_master else None)
        self.exp_avg = torch.zeros(L.shard_numel, dtype=torch.float32, device=dev)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        grad_chunks = model.shard_grad_views()
        param_chunks = model.shard_param_views()
        # Runs of consecutive segments that share a group (one fused call each) and runs
        # that share the count_in_norm flag (one norm each).
        self._adam_runs: list[tuple[int, slice, torch.Tensor, torch.Tensor]] = []
        self._norm_runs: list[tuple[bool, torch.Tensor]] = []
        for key_of, out in ((lambda s: group_of[s.param], "adam"),
                            (lambda s: counted[s.param], "norm")):
            runs: list[list] = []  # [key, bucket, shard_start, numel]
            for s in L.segments:
                k = key_of(s)
                if runs and runs[-1][0] == k and runs[-1][1] == s.bucket \
                        and runs[-1][2] + runs[-1][3] == s.shard_start:
                    runs[-1][3] += s.numel
                else:
                    runs.append([k, s.bucket, s.shard_start, s.numel])
            for k, b, start, n in runs:
                local = start - L.shard_offset(b)
                g = grad_chunks[b][local:local + n]
                if out == "adam":
                    self._adam_runs.append((k, slice(start, start + n), g,
                                            param_chunks[b][local:local + n]))
                else:
                    self._norm_runs.append((k, g))
        if self.separate_master:
            with torch.no_grad():  # master weights start from the (all-equal) model parameters
                for _, sl, _, p in self._adam_runs:
                    self._master[sl].copy_(p)

    @property
    def sharded(self) -> bool:
        """Whether the state is partitioned over DP (the model's ``shard``)."""
        return self.model.shard

    @property
    def master(self) -> torch.Tensor:
        """This rank's fp32 master-weight shard, flat (`layout.shard_numel`,) (unsharded: the
        whole (`layout.numel`,) buffer).

        bf16/fp16: the optimizer's own buffer. fp32: the parameters are the master weights, so
        this is a *copy* gathered from this rank's chunks of the parameter buffer (for
        inspection and checkpoints; writing to it changes nothing).
        """
        if self._master is not None:
            return self._master
        return torch.cat(self.model.shard_param_views())

    @torch.no_grad()
    def _set_master(self, flat: torch.Tensor) -> None:
        """Overwrite this rank's master shard (flat, `layout.shard_numel`)."""
        if self._master is not None:
            self._master.copy_(flat)
            for _, sl, _, p in self._adam_runs:
                p.copy_(self._master[sl])
            return
        L = self.model.layout
        for b, chunk in enumerate(self.model.shard_param_views()):
            s0 = L.shard_offset(b)
            chunk.copy_(flat[s0:s0 + chunk.numel()])

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors the optimizer itself holds (for memory accounting): m, v and, unless
        the parameters are fp32, the master weights; each (`layout.shard_numel`,) fp32:
        1/N_d of the padded buffer sharded, all of it unsharded."""
        own = [self.exp_avg, self.exp_avg_sq]
        return own if self._master is None else [self._master, *own]

    def add_param_group(self, param_group: dict) -> None:
        """Used by the constructor only: the shard layout is fixed once built.

        (Overridden without torch's ``@torch._disable_dynamo`` wrapper, whose first call
        imports ``torch._dynamo``: seconds of start-up per rank for nothing we use.)
        """
        if getattr(self, "model", None) is not None:
            raise RuntimeError("Zero1AdamW cannot add parameter groups after construction")
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self.param_groups.append(group)

    # ------------------------------------------------------------------ mixed precision
    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 without a scaler)."""
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S`` for fp16 (identity otherwise): call ``.backward()`` on the result."""
        return self.loss_scaler.scale_loss(loss) if self.loss_scaler is not None else loss

    # ------------------------------------------------------------------ step
    def _all_reduce_stats(self, t: torch.Tensor) -> None:
        # Sharded, each DP rank holds a disjoint part of Σg²: sum over DP. Unsharded, every
        # rank holds the same all of it (the all-reduced gradients are bitwise equal on every
        # rank, inf/nan included): summing would count it N_d times.
        if self.model.shard and group_size(self.model.dp_group) > 1:
            dist.all_reduce(t, group=self.model.dp_group)
        for g in self.model_parallel_groups:
            if group_size(g) > 1:
                dist.all_reduce(t, group=g)

    @torch.no_grad()
    def grad_norm_and_found_inf(self) -> tuple[float, bool]:
        """Global L2 norm of the (still scaled) gradients and whether any is inf/nan.

        One all-reduce of two float64 numbers per group (gloo and NCCL both reduce float64):
        Σg² of the counted parameters, accumulated in float64 (see `_sum_of_squares_fp64`: the
        norm is the same to ~1e-12 relative for every DP size and mode), and the number of
        non-finite Σg² of any local run (also the not-counted ones).
        """
        self.model.finish_grad_sync()
        stats = torch.zeros(2, dtype=torch.float64, device=self.model.device)
        if self._norm_runs:
            sq = torch.stack([_sum_of_squares_fp64(g) for _, g in self._norm_runs])
            counted = torch.tensor([c for c, _ in self._norm_runs], device=sq.device)
            stats[0] = sq[counted].sum() if counted.any() else 0.0
            stats[1] = (~torch.isfinite(sq)).sum().to(torch.float64)
        self._all_reduce_stats(stats)
        sumsq, nonfinite = stats.tolist()
        found_inf = nonfinite > 0 or not math.isfinite(sumsq)
        return math.sqrt(sumsq) if math.isfinite(sumsq) else float("nan"), found_inf

    @torch.no_grad()
    def step(self, closure=None) -> StepResult:  # noqa: ARG002 - torch signature
        """Unscale, check, clip, update this rank's shard and all-gather the parameters.

        Returns:
            `StepResult(grad_norm, skipped)`; the norm is of the unscaled gradients.
        """
        scaled_norm, found_inf = self.grad_norm_and_found_inf()
        inv_scale = self.loss_scaler.inv_scale if self.loss_scaler is not None else 1.0
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_inf)
        if found_inf and (self.loss_scaler is not None or self.skip_nonfinite):
            self.last = StepResult(float("inf") if math.isnan(scaled_norm) else scaled_norm, True)
            return self.last
        norm = scaled_norm * inv_scale
        factor = inv_scale
        if self.max_grad_norm is not None:
            clip = self.max_grad_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            if clip < 1.0:
                factor *= clip
        if factor != 1.0:
            for g in self.model.shard_grad_views():
                g.mul_(factor)
        self.num_steps += 1
        for g_idx, sl, grad, param_copy in self._adam_runs:
            group = self.param_groups[g_idx]
            beta1, beta2 = group["betas"]
            if self._master is None:  # fp32: the parameter shard is the master
                master, param_copy = param_copy, None
            else:
                master = self._master[sl]
            adamw_step_(master, grad, self.exp_avg[sl], self.exp_avg_sq[sl],
                        step=self.num_steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                        eps=group["eps"], weight_decay=group["weight_decay"],
                        param_copy=param_copy, impl=self.impl)
        self.all_gather_params()
        self.last = StepResult(norm, False)
        return self.last

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Every rank's updated shard -> every rank's full flat parameter buffer (a no-op
        unsharded: every rank updated all of it)."""
        m = self.model
        L = m.layout
        if L.dp == 1:
            return
        handles = []
        for bucket in L.buckets:
            start, n = bucket.chunk(L.rank, L.dp)
            handles.append(all_gather_async(m.param_buffer[bucket.start:bucket.start + bucket.numel],
                                            m.param_buffer[start:start + n], m.dp_group))
        for h in handles:
            if h is not None:
                h.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002
        """Zero the model's fp32 main-grad buffer (the low-precision grads are already freed)."""
        self.model.zero_grad()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard (master, exp_avg, exp_avg_sq) and the hyper-parameters.

        Load it back with `load_state_dict` on the same DP size, mode and model; to change the
        DP size or the mode use `full_state_dict` / `load_full_state_dict`. ``dp_size`` and
        ``dp_rank`` are the layout's shard count and index ((1, 0) unsharded).
        """
        L = self.model.layout
        return {
            "format": "haillm.zero.Zero1AdamW/sharded-v1",
            "dp_size": L.dp, "dp_rank": L.rank, "numel": L.numel, "shard": self.model.shard,
            "buckets": [(b.start, b.numel) for b in L.buckets],
            "param_names": list(self.model.param_names),
            "master": self.master.clone(), "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "num_steps": self.num_steps, "param_groups": self._hparams(),
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler else None,
        }

    def _hparams(self) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]

    def _load_common(self, state: dict) -> None:
        if len(state["param_groups"]) != len(self.param_groups):
            raise ValueError(f"state has {len(state['param_groups'])} param groups, optimizer "
                             f"has {len(self.param_groups)}")
        for g, saved in zip(self.param_groups, state["param_groups"]):
            g.update(saved)
        self.num_steps = int(state["num_steps"])
        if self.loss_scaler is not None and state.get("loss_scaler"):
            self.loss_scaler.load_state_dict(state["loss_scaler"])

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load this rank's shard saved by `state_dict` (same DP size and layout), and copy the
        master weights into the model's parameters."""
        L = self.model.layout
        if state.get("format") != "haillm.zero.Zero1AdamW/sharded-v1":
            raise ValueError("not a Zero1AdamW sharded state dict (for a full one use "
                             "load_full_state_dict)")
        if (state["dp_size"], state["dp_rank"], state["numel"]) != (L.dp, L.rank, L.numel) or \
                state["param_names"] != self.model.param_names or \
                [tuple(b) for b in state["buckets"]] != [(b.start, b.numel) for b in L.buckets]:
            raise ValueError(f"sharded state was saved with dp_size={state['dp_size']}, "
                             f"rank={state['dp_rank']}, numel={state['numel']}; this optimizer "
                             f"has dp_size={L.dp}, rank={L.rank}, numel={L.numel} (or other buckets): use "
                             "full_state_dict()/load_full_state_dict() to change layouts")
        self._set_master(state["master"].to(self.exp_avg.device))
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self._load_common(state)
        self.all_gather_params()

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """Gather the whole optimizer state on every rank (collective: call on all DP ranks;
        unsharded, every rank already holds it and nothing is communicated).

        Returns:
            ``{"master"|"exp_avg"|"exp_avg_sq": {name: fp32 tensor shaped like the parameter},
            "num_steps", "param_groups", "loss_scaler"}``: independent of the DP size and of
            the mode.
        """
        m, L = self.model, self.model.layout
        out: dict = {"format": "haillm.zero.Zero1AdamW/full-v1"}
        for key, shard in (("master", self.master), ("exp_avg", self.exp_avg),
                           ("exp_avg_sq", self.exp_avg_sq)):
            flat = torch.zeros(L.numel, dtype=torch.float32, device=m.device)
            for b, bucket in enumerate(L.buckets):
                s0 = L.shard_offset(b)
                n = bucket.numel // L.dp
                flat[bucket.start + L.rank * n:bucket.start + (L.rank + 1) * n] = shard[s0:s0 + n]
            handles = [all_gather_async(flat[bk.start:bk.start + bk.numel],
                                        flat[bk.start + L.rank * (bk.numel // L.dp):
                                             bk.start + (L.rank + 1) * (bk.numel // L.dp)],
                                        m.dp_group) for bk in L.buckets] if L.dp > 1 else []
            for h in handles:
                if h is not None:
                    h.wait()
            out[key] = {name: flat[off:off + p.numel()].view_as(p).clone()
                        for name, p, off in zip(m.param_names, m.params, L.param_offsets)}
        out.update(num_steps=self.num_steps, param_groups=self._hparams(),
                   loss_scaler=self.loss_scaler.state_dict() if self.loss_scaler else None)
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict) -> None:
        """Load a `full_state_dict` (saved with any DP size, sharded or not): each rank keeps
        its shard (unsharded: everything), and the model's parameters are set from the master
        weights."""
        m, L = self.model, self.model.layout
        missing = set(m.param_names) - set(state["master"])
        if missing:
            raise ValueError(f"full state dict lacks parameters {sorted(missing)[:5]}")
        shards = [("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)]
        if self._master is not None:  # (fp32: the parameters, set below, are the master)
            shards.append(("master", self._master))
        for key, shard in shards:
            for s in L.segments:
                src = state[key][m.param_names[s.param]].reshape(-1)
                shard[s.shard_start:s.shard_start + s.numel] = src[s.param_start:
                                                                   s.param_start + s.numel]
        self._load_common(state)
        for name, p in zip(m.param_names, m.params):
            p.copy_(state["master"][name].to(p.dtype))
