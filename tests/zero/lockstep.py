"""Zero1AdamW against a reference optimizer, one step at a time from the same state.

Why one step at a time: two runs whose gradients differ in the last bits (other summation
orders) drift apart at a rate no tolerance can be derived for, because AdamW's normalised
update m / (sqrt(v) + eps) divides a gradient by its own size: where |g| ~ eps (a width-1
layer, a cancelling sum) one rounding of g moves the parameter by up to ~lr. So before every
step the reference takes the state of the ZeRO run (`full_state_dict`), and each step is
checked against what follows from the maths, nothing measured:

1. the gradient: the reference runs every rank's micro-batches through the plain module (the
   same parameters, the same micro-batches, the same fp32 accumulation: each rank's local
   gradient g_r, bit for bit what that rank's ZeRO hooks accumulate) and the ZeRO gradient (this
   rank's shard, averaged over DP, before clipping) must be their average up to the order of
   the DP sum: |g - Sigma_r g_r / dp| <= sum_rounding(dp) eps32 Sigma_r |g_r| / dp per element
   (dp = 1: bit for bit). Data parallelism IS that average; that the micro-batch losses / micro
   add up to the whole batch's loss is the reference's arithmetic, not ZeRO's;
2. the norm: |norm - ||Sigma||| <= ||g - Sigma|| (triangle inequality) + its float64 sum;
3. the clip: g_used = g x factor within the two roundings of that product;
4. p, m, v after the step against `adamw_exact` of (state before, g_used), per element, for the
   ZeRO run AND for `torch.optim.AdamW` on the reference's own gradient (fp32 sum over the ranks,
   `clip_grad_norm_`), which checks that `adamw_exact` is torch's formula.

(An earlier version compared the gradient with the float64 truth by the low-precision rule
against torch's whole-batch gradient; the explore sweep found seeds where the micro-batched
gradient's error was 2.4 x torch's: other BLAS calls for other batch sizes round each row's
backward differently, which no "2 x" rule bounds. Bit-identical partials do not have that
problem.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.helpers import adamw_exact, assert_within_roundings, sum_rounding

EPS64 = torch.finfo(torch.float64).eps


def owned_index(layout, device=None) -> torch.Tensor:
    """Flat-buffer positions of this rank's shard, in shard order: (shard_numel,) int64."""
    parts = [torch.arange(start, start + n, device=device) for start, n in
             (b.chunk(layout.rank, layout.dp) for b in layout.buckets)]
    return torch.cat(parts)


def to_buffer(ddp, tensors) -> torch.Tensor:
    """Per-parameter tensors (in `ddp.param_names` order) -> one float64 (numel,) vector in the
    flat-buffer order of `ddp.layout` (padding 0)."""
    L = ddp.layout
    flat = torch.zeros(L.numel, dtype=torch.float64, device=ddp.device)
    for t, off, n in zip(tensors, L.param_offsets, L.param_numels):
        flat[off:off + n] = t.detach().double().reshape(-1)
    return flat


def hparams(ddp, opt) -> dict[str, torch.Tensor]:
    """Each element's AdamW hyper-parameters (its group's), float64, in shard order."""
    index = {id(p): i for i, p in enumerate(ddp.params)}
    cols = {k: [0.0] * ddp.layout.num_params for k in ("lr", "beta1", "beta2", "eps",
                                                       "weight_decay")}
    for g in opt.param_groups:
        for p in g["params"]:
            i = index[id(p)]
            cols["lr"][i], cols["eps"][i], cols["weight_decay"][i] = g["lr"], g["eps"], \
                g["weight_decay"]
            cols["beta1"][i], cols["beta2"][i] = g["betas"]
    idx = owned_index(ddp.layout, ddp.device)
    return {k: to_buffer(ddp, [torch.full((n,), v, dtype=torch.float64, device=ddp.device)
                          for v, n in zip(vals, ddp.layout.param_numels)])[idx]
            for k, vals in cols.items()}


def check_adamw_step(after, before, g_used, *, step: int, name: str, **hp) -> None:
    """p, m, v `after` one step from `before` with gradient `g_used` equal `adamw_exact`'s."""
    exact, mags = adamw_exact(*before, g_used, step=step, **hp)
    for what, got, want, mag in zip(("param", "exp_avg", "exp_avg_sq"), after, exact, mags):
        assert_within_roundings(got, want, mag, dtype=torch.float32, name=f"{name} {what}")


def same_layout_(module, ddp):
    """Move `module`'s parameters into one flat buffer at the offsets of `ddp.param_buffer`
    (in place; returns the module). BLAS rounds differently at other memory alignments (tried:
    a standalone copy of the model gives 1-ulp different gradients at dp = 1), and the
    reference's per-micro-batch gradients must be the same bits as the ZeRO model's."""
    buffer = torch.zeros_like(ddp.param_buffer)
    with torch.no_grad():
        for p, off in zip(module.parameters(), ddp.layout.param_offsets):
            view = buffer[off:off + p.numel()].view_as(p)
            view.copy_(p)
            p.data = view
    return module


def mean_and_bound(partials: torch.Tensor, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, numel) partial gradients -> their exact sum / dp and the bound, in units of eps32,
    of any fp32 order of that sum: sum_rounding(n) Sigma |partials| / dp (the 1/dp of a power
    of two is exact)."""
    n = partials.shape[0]
    return partials.sum(0) / dp, sum_rounding(n) * partials.abs().sum(0) / dp


def adamw_state(full: dict, name: str) -> dict:
    """torch.optim.AdamW's state of parameter `name` from a Zero1AdamW `full_state_dict`."""
    return {"step": torch.tensor(float(full["num_steps"])),
            "exp_avg": full["exp_avg"][name].clone(),
            "exp_avg_sq": full["exp_avg_sq"][name].clone()}


def _all_reduce(t: torch.Tensor, ddp) -> torch.Tensor:
    if ddp.shard and ddp.dp > 1:
        dist.all_reduce(t, group=ddp.dp_group)
    return t


class ZeroStep:
    """Runs `opt.step()` on a ZeroDataParallel model whose micro-batches are done, capturing
    the shard's state before, the gradient before and after clipping, and checks 2-4."""

    def __init__(self, ddp, opt):
        self.ddp, self.opt = ddp, opt
        self.idx = owned_index(ddp.layout, ddp.device)
        self.hp = hparams(ddp, opt)

    def __call__(self, name: str = "ZeRO"):
        ddp, opt = self.ddp, self.opt
        before = (opt.master.clone(), opt.exp_avg.clone(), opt.exp_avg_sq.clone())
        norm, _ = opt.grad_norm_and_found_inf()  # waits for the gradient sync
        g = torch.cat(ddp.shard_grad_views()).clone()
        res = opt.step()
        assert not res.skipped and res.grad_norm == norm
        g_used = torch.cat(ddp.shard_grad_views()).clone()
        factor = 1.0
        if opt.max_grad_norm is not None:
            factor = min(1.0, opt.max_grad_norm / (norm + 1e-6))  # clip_grad_norm_'s rule
        if factor == 1.0:
            assert torch.equal(g_used, g), f"{name}: gradient changed without clipping"
        else:  # (the factor rounded to fp32, then the product)
            want = g.double() * factor
            assert_within_roundings(g_used, want, want.abs(), dtype=torch.float32,
                                    name=f"{name} clipped gradient")
        check_adamw_step((opt.master, opt.exp_avg, opt.exp_avg_sq), before, g_used,
                         step=opt.num_steps, name=name, **self.hp)
        if opt.separate_master:  # bf16 / fp16 parameters: the master's rounding, bit for bit
            p = torch.cat(ddp.shard_param_views())
            assert torch.equal(p, opt.master.to(p.dtype)), f"{name}: params != rounded master"
        return res, g

    def check_norm(self, norm: float, g: torch.Tensor, truth: torch.Tensor, name="ZeRO"):
        """2: `norm` (the run's) of the gradient `g` (this rank's shard) against the exact
        gradient `truth` (float64, full buffer order)."""
        d2 = _all_reduce(torch.tensor([(g.double() - truth[self.idx]).square().sum().item()],
                                      dtype=torch.float64, device=g.device), self.ddp)
        bound = d2.sqrt().item() + g.numel() * self.ddp.dp * EPS64 * norm
        want = truth.norm().item()
        assert abs(norm - want) <= bound, f"{name}: grad norm {norm} vs truth {want} (> {bound:.2e})"


class TorchAdamWLockstep:
    """The fp32 reference: one process running every rank's micro-batches on the plain
    module, `torch.optim.AdamW` with the same groups and `clip_grad_norm_`, reset to the ZeRO
    run's state before every step."""

    def __init__(self, ddp, opt, make_ref, loss_fn, clip=None):
        self.ddp, self.opt, self.loss_fn, self.clip = ddp, opt, loss_fn, clip
        self.zero = ZeroStep(ddp, opt)
        self.ref = same_layout_(make_ref(), ddp)
        by_id = {id(p): n for n, p in ddp.module.named_parameters()}
        mine = dict(self.ref.named_parameters())
        groups = []
        for g in opt.param_groups:
            hp = {k: v for k, v in g.items() if k != "params"}
            groups.append(dict(hp, params=[mine[by_id[id(p)]] for p in g["params"]]))
        self.ropt = torch.optim.AdamW(groups)
        self.names = ddp.param_names

    def sync(self) -> None:
        """Reference parameters and AdamW state := the ZeRO run's (collective)."""
        full = self.opt.full_state_dict()
        mine = dict(self.ref.named_parameters())
        with torch.no_grad():
            for n in self.names:
                mine[n].copy_(full["master"][n])
                self.ropt.state[mine[n]] = adamw_state(full, n)

    def step(self, data):
        """After the ZeRO run's micro-batches of this step (`data`: [rank][micro] of (x, y)):
        its optimizer step and every check of the module doc. Returns its StepResult."""
        ddp, idx, dp = self.ddp, self.zero.idx, len(data)
        mine = dict(self.ref.named_parameters())
        params = [mine[n] for n in self.names]
        local = []  # each rank's fp32 gradient, as its hooks accumulate it
        for rank in data:
            for x, y in rank:
                (self.loss_fn(self.ref(x), y) / len(rank)).backward()
            local.append([p.grad for p in params])
            for p in params:
                p.grad = None
        exact, bound = mean_and_bound(torch.stack([to_buffer(ddp, g) for g in local]), dp)
        res, g = self.zero()
        assert_within_roundings(g, exact[idx], bound[idx], dtype=torch.float32,
                                name=f"ZeRO gradient (dp={ddp.dp}, micro={len(data[0])})")
        self.zero.check_norm(res.grad_norm, g, exact)
        # the reference step from the same state, on its own fp32 average
        for k, p in enumerate(params):
            p.grad = torch.stack([g[k] for g in local]).sum(0) / dp
        torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip else float("inf"))
        g_used = [p.grad.clone() for p in params]
        before = [(p.detach().clone(), self.ropt.state[p]["exp_avg"].clone(),
                   self.ropt.state[p]["exp_avg_sq"].clone()) for p in params]
        self.ropt.step()
        self.ropt.zero_grad()
        for n, p, b, gu, g_idx in zip(self.names, params, before, g_used, self._group_of(params)):
            grp = self.ropt.param_groups[g_idx]
            st = self.ropt.state[p]
            check_adamw_step((p.detach(), st["exp_avg"], st["exp_avg_sq"]), b, gu,
                             step=int(st["step"].item()), name=f"torch.optim.AdamW {n}",
                             lr=grp["lr"], beta1=grp["betas"][0], beta2=grp["betas"][1],
                             eps=grp["eps"], weight_decay=grp["weight_decay"])
        return res

    def _group_of(self, params):
        of = {id(p): k for k, g in enumerate(self.ropt.param_groups) for p in g["params"]}
        return [of[id(p)] for p in params]


class MixedPrecisionLockstep:
    """The bf16/fp16 reference: `MixedPrecisionAdamW` (low-precision module, fp32 masters and
    grads) running every rank's micro-batches, reset to the ZeRO run's bf16 parameters,
    masters, m and v before every step. Both backward passes compute the same low-precision
    partial gradients (the same parameters at the same offsets, the same micro-batches), which
    the two runs only add in other orders: |g - Sigma| <= sum_rounding(dp x micro) eps32
    Sigma|terms| for both; then each one's masters, m, v to `adamw_exact` of the gradient it
    used, and the low-precision parameters = the rounded masters, bit for bit."""

    def __init__(self, ddp, opt, ref, loss_fn, clip=None, **adamw_kw):
        from haillm.zero.reference import MixedPrecisionAdamW

        self.ddp, self.opt, self.loss_fn, self.clip = ddp, opt, loss_fn, clip
        self.zero = ZeroStep(ddp, opt)
        self.ref = same_layout_(ref, ddp)
        self.ropt = MixedPrecisionAdamW(self.ref, **adamw_kw)
        g = self.ropt.opt.param_groups[0]
        self.hp = dict(lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"],
                       weight_decay=g["weight_decay"])

    def sync(self) -> None:
        full = self.opt.full_state_dict()
        with torch.no_grad():
            for (n, p), q, mq in zip(self.ddp.module.named_parameters(), self.ref.parameters(),
                                     self.ropt.masters):
                q.copy_(p)
                mq.copy_(full["master"][n])
                self.ropt.opt.state[mq] = adamw_state(full, n)

    def step(self, data):
        """After the ZeRO run's micro-batches (`data`: [rank][micro] of (x, y)): the reference
        step, the ZeRO step, every check. Returns the ZeRO run's StepResult."""
        ddp, dp, micro = self.ddp, len(data), len(data[0])
        ropt = self.ropt
        partials = []
        for rank in data:
            for x, y in rank:
                (self.loss_fn(self.ref(x), y) / micro).backward()
                partials.append(to_buffer(ddp, [q.grad for q in self.ref.parameters()]))
                ropt.accumulate()
        exact, bound = mean_and_bound(torch.stack(partials), dp)
        scale = 1.0 / dp
        if self.clip is not None:  # the reference's own norm of its averaged fp32 gradient
            norm = torch.linalg.vector_norm(torch.stack(
                [(mq.grad * scale).norm() for mq in ropt.masters])).item()
            scale *= min(1.0, self.clip / (norm + 1e-6))
        g_ref = [mq.grad.clone().mul_(scale) for mq in ropt.masters]  # as ropt.step does
        before = [(mq.detach().clone(), ropt.opt.state[mq]["exp_avg"].clone(),
                   ropt.opt.state[mq]["exp_avg_sq"].clone()) for mq in ropt.masters]
        ropt.step(grad_scale=scale)
        if self.clip is None:
            assert_within_roundings(to_buffer(ddp, g_ref), exact, bound, dtype=torch.float32,
                                    name="reference gradient")
        for q, mq, b, g in zip(self.ref.parameters(), ropt.masters, before, g_ref):
            st = ropt.opt.state[mq]
            check_adamw_step((mq.detach(), st["exp_avg"], st["exp_avg_sq"]), b, g,
                             step=int(st["step"].item()), name="MixedPrecisionAdamW", **self.hp)
            assert torch.equal(q, mq.detach().to(q.dtype))
        res, g = self.zero(f"ZeRO {ddp.param_dtype}")
        idx = self.zero.idx
        assert_within_roundings(g, exact[idx], bound[idx], dtype=torch.float32,
                                name=f"ZeRO {ddp.param_dtype} gradient (dp={dp}, micro={micro})")
        self.zero.check_norm(res.grad_norm, g, exact)
        return res

