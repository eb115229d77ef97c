"""ZeRO-1 on 1, 2 and 4 gloo ranks: every case runs inside ONE `run_distributed` per world size.

The ranks are forked from the pytest process, so they inherit its imports: torch.optim's
optimizers import `torch._dynamo` on first construction (seconds per process on a loaded
machine), which we pay once here instead of once per rank.

Each rank computes the single-process reference itself (same seeds, whole batch) and compares;
failures raise inside the rank and come back as `RankFailure` with the rank's traceback.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, inherited by the forked ranks
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from haillm.zero import DynamicLossScaler, Zero1AdamW, ZeroDataParallel, weight_decay_groups
from haillm.zero.memory import measured_bytes
from haillm.zero.reference import naive_zero1_step
from tests.helpers import assert_within_roundings, norm_rtol, run_distributed, sum_rounding
from tests.zero.lockstep import (
    MixedPrecisionLockstep,
    TorchAdamWLockstep,
    ZeroStep,
    check_adamw_step,
    same_layout_,
    to_buffer,
)

DIMS = (7, 13, 5)  # odd sizes: parameters straddle chunk boundaries


def make_model(dtype=torch.float32, seed=0, dims=DIMS):
    d_in, d_hid, d_out = dims
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hid), nn.Tanh(), nn.LayerNorm(d_hid),
                         nn.Linear(d_hid, d_hid), nn.GELU(), nn.Linear(d_hid, d_out)).to(dtype)


def batches(step, dp, micro, rows=3, dtype=torch.float32, dims=DIMS):
    """The global batch of `step` as a list [rank][micro] of (x, y) pairs."""
    g = torch.Generator().manual_seed(1000 + step)
    return [[(torch.randn(rows, dims[0], generator=g).to(dtype),
              torch.randn(rows, dims[2], generator=g).to(dtype)) for _ in range(micro)]
            for _ in range(dp)]


def loss_fn(out, y):
    t = torch.promote_types(out.dtype, torch.float32)  # fp32 for bf16/fp16 models, fp64 kept
    return (out.to(t) - y.to(t)).square().mean()


def train_zero(ddp, opt, steps, micro, dtype, record=None, dims=DIMS, lockstep=None):
    """`steps` steps of `micro` micro-batches; with `lockstep` (a `TorchAdamWLockstep`) every
    step is checked against the reference from the same state (tests/zero/lockstep.py)."""
    dp, r = ddp.dp, ddp.dp_rank
    results = []
    for step in range(steps):
        data = batches(step, dp, micro, dtype=dtype, dims=dims)
        if lockstep is not None:
            lockstep.sync()
        for k, (x, y) in enumerate(data[r]):
            last = k == micro - 1
            ddp.set_grad_sync(last)
            if record is not None:
                record.append(("bwd_start", k, 0))
            opt.scale_loss(loss_fn(ddp(x), y) / micro).backward()
            if record is not None:
                record.append(("bwd_end", k, 0))
        results.append(lockstep.step(data) if lockstep is not None else opt.step())
        opt.zero_grad()
    return results


def build_fp32(dims=DIMS, *, lr=1e-2, lr_second_group=3e-3, eps=1e-8, clip=None, **ddp_kw):
    """ZeroDataParallel + Zero1AdamW (fp32) with two groups (the no-decay one at its own lr)
    and the torch.optim.AdamW reference that checks it step by step."""
    ddp = ZeroDataParallel(make_model(dims=dims), **ddp_kw)
    groups = weight_decay_groups(ddp, 0.1)
    groups[1]["lr"] = lr_second_group  # per-group learning rate
    opt = Zero1AdamW(ddp, lr=lr, eps=eps, precision="fp32", param_groups=groups,
                     max_grad_norm=clip)
    return ddp, opt, TorchAdamWLockstep(ddp, opt, lambda: make_model(dims=dims), loss_fn, clip)


def case_fp32_equals_torch_adamw(bucket_mb, overlap, rs_impl, clip, micro=3, steps=3, dims=DIMS,
                                 eps=1e-8):
    """Every step equals torch.optim.AdamW's on the whole batch from the same state: the
    gradient to the low-precision rule, the step to `adamw_exact`'s roundings."""
    ddp, opt, lockstep = build_fp32(dims, eps=eps, clip=clip, bucket_mb=bucket_mb,
                                    overlap=overlap, reduce_scatter=rs_impl)
    train_zero(ddp, opt, steps, micro, torch.float32, dims=dims, lockstep=lockstep)
    return ddp, opt


def case_bf16_equals_mixed_precision_reference(micro=2, steps=3, clip=None):
    """bf16 parameters, fp32 masters/grads, against MixedPrecisionAdamW from the same state
    each step (`MixedPrecisionLockstep`: the same bf16 partial gradients added in other orders,
    each step to `adamw_exact`, the bf16 parameters the rounded masters bit for bit)."""
    ddp = ZeroDataParallel(make_model(torch.bfloat16), bucket_mb=200 * 4 / 2**20)
    opt = Zero1AdamW(ddp, lr=1e-2, weight_decay=0.01, precision="bf16", max_grad_norm=clip)
    check = MixedPrecisionLockstep(ddp, opt, make_model(torch.bfloat16), loss_fn, clip,
                                   lr=1e-2, weight_decay=0.01)
    train_zero(ddp, opt, steps, micro, torch.bfloat16, lockstep=check)


def case_optimizer_bytes(ddp, opt):
    """fp32: 8 B per owned element (m, v: the parameters are the master weights), as torch's
    ZeroRedundancyOptimizer(AdamW); bf16: 12 B (+ the fp32 master copy)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    L, dp = ddp.layout, ddp.dp
    psi = sum(p.numel() for p in ddp.module.parameters())
    got = measured_bytes(ddp, opt)
    assert opt.precision == "fp32" and not opt.separate_master
    assert got["optimizer"] == 8 * L.shard_numel == 8 * (psi + L.padding) // dp
    # the peer: torch's ZeRO-1 holds exp_avg and exp_avg_sq for the parameters it owns
    ref = make_model()
    zro = ZeroRedundancyOptimizer(ref.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
    for q in ref.parameters():
        q.grad = torch.ones_like(q)
    zro.step()
    owned = sum(q.numel() for q in zro.optim.state)
    held = sum(t.numel() * t.element_size() for st in zro.optim.state.values()
               for t in st.values() if t.dim() > 0)  # (not the 0-d step counters)
    assert held == 8 * owned
    assert torch.equal(opt.master, torch.cat(ddp.shard_param_views()))  # a gathered copy
    bf = ZeroDataParallel(make_model(torch.bfloat16), bucket_mb=ddp.bucket_mb)
    obf = Zero1AdamW(bf, lr=1e-3, precision="bf16")
    assert measured_bytes(bf, obf)["optimizer"] == 12 * bf.layout.shard_numel
    assert L.padding < len(L.buckets) * dp * 16
    assert got["grads"] == 4 * (psi + L.padding) and got["params"] == 4 * (psi + L.padding)


def case_overlap_event_order(micro=3, shard=True):
    """The first bucket's collective (sharded: reduce-scatter, unsharded: all-reduce) starts
    from a hook inside the last micro-batch's backward, before earlier gradients exist."""
    start = "reduce_scatter_start" if shard else "all_reduce_start"
    ddp = ZeroDataParallel(make_model(), bucket_mb=64 * 4 / 2**20, shard=shard)  # several buckets
    assert len(ddp.layout.buckets) >= 3 and ddp.comm + "_start" == start
    opt = Zero1AdamW(ddp, lr=1e-3, precision="fp32")
    ddp.trace = []
    train_zero(ddp, opt, 2, micro, torch.float32, record=ddp.trace)
    ev = [(e, i) for e, i, _ in ddp.trace]
    # split the trace into micro-batch backward windows
    starts = [j for j, (e, _) in enumerate(ev) if e == "bwd_start"]
    ends = [j for j, (e, _) in enumerate(ev) if e == "bwd_end"]
    for s, e in zip(starts, ends):
        k = ev[s][1]
        window = ev[s:e]
        rs = [j for j, (name, _) in enumerate(window) if name == start]
        if k != micro - 1:
            assert not rs, f"{start} during micro-batch {k}'s backward (no_sync)"
        else:
            assert window[rs[0]] == (start, 0)
            # every bucket was launched inside the backward, in bucket order
            assert [i for name, i in window if name == start] == list(range(len(ddp.layout.buckets)))
            later = [name for name, _ in window[rs[0]:] if name == "grad_ready"]
            assert later, "bucket 0 started only after the whole backward: no overlap"
    # overlap=False: nothing starts inside a backward
    ddp2 = ZeroDataParallel(make_model(), bucket_mb=64 * 4 / 2**20, overlap=False, shard=shard)
    opt2 = Zero1AdamW(ddp2, lr=1e-3, precision="fp32")
    ddp2.trace = []
    train_zero(ddp2, opt2, 1, 2, torch.float32, record=ddp2.trace)
    names = [e for e, _, _ in ddp2.trace]
    assert names.index(start) > max(j for j, n in enumerate(names) if n == "bwd_end")


def case_loss_scaler_skips_on_inf():
    dp, r = dist.get_world_size(), dist.get_rank()
    ddp = ZeroDataParallel(make_model(torch.float16), bucket_mb=100 * 4 / 2**20)
    opt = Zero1AdamW(ddp, lr=1e-2, precision="fp16",
                     loss_scaler=DynamicLossScaler(init_scale=2.0**8, growth_interval=2))
    train_zero(ddp, opt, 1, 1, torch.float16)
    assert opt.loss_scale == 2.0**8
    before = [p.detach().clone() for p in ddp.module.parameters()]
    master = opt.master.clone()
    x, y = batches(5, dp, 1, dtype=torch.float16)[r][0]
    if r == dp - 1:
        x[0, 0] = float("inf")  # overflow on ONE rank only
    opt.scale_loss(loss_fn(ddp(x), y)).backward()
    res = opt.step()
    opt.zero_grad()
    assert res.skipped and opt.loss_scale == 2.0**7
    for p, q in zip(ddp.module.parameters(), before):
        assert torch.equal(p, q)
    assert torch.equal(opt.master, master) and opt.num_steps == 1
    res2 = train_zero(ddp, opt, 2, 1, torch.float16)
    assert not any(s.skipped for s in res2)
    assert opt.loss_scale == 2.0**8 and opt.num_steps == 3  # grown after 2 clean steps


def case_state_dict_roundtrip(ddp, opt):
    full = opt.full_state_dict()
    sharded = opt.state_dict()
    ddp2 = ZeroDataParallel(make_model(seed=0), bucket_mb=ddp.bucket_mb)
    opt2 = Zero1AdamW(ddp2, lr=1.0, precision="fp32", param_groups=weight_decay_groups(ddp2, 0.0))
    opt2.load_state_dict(sharded)
    for a, b in zip(ddp.module.parameters(), ddp2.module.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[1]["lr"] == opt.param_groups[1]["lr"]
    ddp3 = ZeroDataParallel(make_model(seed=0), bucket_mb=1.0)  # another layout: one bucket
    opt3 = Zero1AdamW(ddp3, lr=1.0, precision="fp32", param_groups=weight_decay_groups(ddp3, 0.0))
    opt3.load_full_state_dict(full)
    full3 = opt3.full_state_dict()
    for key in ("master", "exp_avg", "exp_avg_sq"):
        for name in full[key]:
            assert torch.equal(full[key][name], full3[key][name]), (key, name)
    with pytest.raises(ValueError, match="full_state_dict"):
        opt3.load_state_dict(sharded)


def case_naive_reference(steps=2, micro=2):
    """The teaching version (`naive_zero1_step`) and the real one, each step from the same
    state: both add the same per-rank fp32 gradients (the same micro-batches' sum on each rank)
    over DP in other orders, |g - Sigma| <= sum_rounding(dp) eps Sigma_r |g_r|, and each takes
    the step `adamw_exact` gives for the gradient it used."""
    import haillm.zero.reference as naive_mod

    dp, r = ddp_world()
    ddp = ZeroDataParallel(make_model(), bucket_mb=50 * 4 / 2**20)
    model = same_layout_(make_model(), ddp)
    opt = Zero1AdamW(ddp, lr=1e-2, weight_decay=0.1, precision="fp32")
    zero_step = ZeroStep(ddp, opt)
    names = ddp.param_names
    psi = sum(ddp.layout.param_numels)
    size = -(-psi // dp)  # naive_zero1_step's slice: ceil(psi / dp), the last one padded
    calls = []
    real = naive_mod.adamw_step_

    def recorded(p, g, m, v, **kw):  # naive_zero1_step's own AdamW call, inputs and outputs
        before = (p.clone(), m.clone(), v.clone())
        real(p, g, m, v, **kw)
        calls.append((before, g.clone(), (p, m, v), kw))

    naive_mod.adamw_step_ = recorded
    try:
        for step in range(steps):
            full = opt.full_state_dict()
            flat = {k: F.pad(torch.cat([full[k][n].reshape(-1) for n in names]),
                             (0, size * dp - psi))[r * size:(r + 1) * size]
                    for k in ("master", "exp_avg", "exp_avg_sq")}
            with torch.no_grad():
                for n, p in zip(names, model.parameters()):
                    p.copy_(full["master"][n])
            state = dict(master=flat["master"].clone(), step=full["num_steps"],
                         m=flat["exp_avg"].clone(), v=flat["exp_avg_sq"].clone())
            data = batches(step, dp, micro)[r]
            for x, y in data:
                (loss_fn(model(x), y) / micro).backward()
            local = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
            terms = torch.stack([local, local.abs()])
            dist.all_reduce(terms)  # float64: Sigma_r g_r and Sigma_r |g_r|, exact to ~1e-16
            exact, bound = terms[0] / dp, sum_rounding(dp) * terms[1] / dp
            naive_zero1_step(list(model.parameters()), state, lr=1e-2, weight_decay=0.1)
            before, g, after, kw = calls.pop()
            kw = {k: v for k, v in kw.items() if k != "impl"}
            pad = (0, size * dp - psi)
            mine = slice(r * size, (r + 1) * size)
            assert_within_roundings(g, F.pad(exact, pad)[mine], F.pad(bound, pad)[mine],
                                    dtype=torch.float32, name=f"naive gradient (dp={dp})")
            check_adamw_step(after, before, g, name="naive_zero1_step", **kw)
            for k, (x, y) in enumerate(data):
                ddp.set_grad_sync(k == micro - 1)
                (loss_fn(ddp(x), y) / micro).backward()
            _, gz = zero_step("ZeRO (naive case)")
            idx = zero_step.idx
            buf, bbuf = (to_buffer(ddp, t.split(ddp.layout.param_numels))[idx]
                         for t in (exact, bound))
            assert_within_roundings(gz, buf, bbuf, dtype=torch.float32,
                                    name=f"ZeRO gradient (naive case, dp={dp})")
            opt.zero_grad()
    finally:
        naive_mod.adamw_step_ = real


def ddp_world():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def case_placement_mismatch():
    """Parameters differing across the DP ranks (e.g. a TP group passed as DP) are refused."""
    try:
        ZeroDataParallel(make_model(seed=dist.get_rank()))
    except ValueError as e:
        assert "differ across the ranks of dp_group" in str(e)
    else:
        raise AssertionError("no error for differing replicas")
    with pytest.raises(ValueError, match="gloo but the parameters are on meta"):
        ZeroDataParallel(make_model().to("meta"))


def case_norm_over_model_parallel_group():
    """DP = 1 per rank, the world as a 'TP' group: a sharded weight and a replicated bias."""
    world, r = dist.get_world_size(), dist.get_rank()
    solo = dist.new_group([r]) if world > 1 else None
    if world > 1:  # every rank must create every group
        groups = [dist.new_group([k]) for k in range(world)]
        solo = groups[r]
    torch.manual_seed(r)
    shard = nn.Linear(4, 3, bias=False)  # different on each rank ("TP-sharded")
    torch.manual_seed(99)
    rep = nn.LayerNorm(3)  # identical on every rank ("replicated")
    model = nn.Sequential(shard, rep)
    ddp = ZeroDataParallel(model, dp_group=solo)
    opt = Zero1AdamW(ddp, lr=1e-2, precision="fp32", model_parallel_groups=[dist.group.WORLD],
                     count_in_norm=lambda name, p: name.startswith("0.") or r == 0)
    model(torch.ones(2, 4)).sum().backward()
    norm, found_inf = opt.grad_norm_and_found_inf()
    local_sq = shard.weight.grad if shard.weight.grad is not None else ddp.main_grad_of("0.weight")
    sq = torch.tensor([local_sq.square().sum().item()])
    dist.all_reduce(sq)
    # counted once, from TP rank 0 (here the "replicated" grads differ per rank, so this also
    # checks that the other ranks' copies were not counted)
    rep_sq = torch.tensor([sum(ddp.main_grad_of(n).square().sum().item()
                               for n in ("1.weight", "1.bias"))])
    if world > 1:
        dist.broadcast(rep_sq, src=0)
    expected = (sq.item() + rep_sq.item()) ** 0.5
    rtol = norm_rtol(world * shard.weight.numel() + 6)  # the same grads, summed in two orders
    assert not found_inf and abs(norm - expected) <= rtol * expected, (norm, expected)


def all_cases(world, seed=0):
    # random odd shapes (width-1 layers included), drawn from the test's seed
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        # (LayerNorm over 1 or 2 features is constant or a sign: its input gradient is 0 in exact
        # arithmetic: Adam then normalises pure rounding noise, nothing to compare)
        d_in, d_hid, d_out = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
        dims = (d_in, max(d_hid, 3), d_out)
        bucket = int(torch.randint(1, 200, (1,), generator=g)) * 4 / 2**20
        case_fp32_equals_torch_adamw(bucket, True, "auto", None, micro=2, steps=2, dims=dims)
    # Width-1 input and output: some gradients are ~1e-10, where Adam's m / (sqrt(v) + eps)
    # turns a gradient's last-bit rounding into a visible step (why runs are compared step by
    # step: tests/zero/lockstep.py); both eps, the default and a damping one.
    for eps in (1e-8, 1e-6):
        case_fp32_equals_torch_adamw(0.001, True, "auto", 0.1, micro=2, steps=2, dims=(1, 127, 1),
                                     eps=eps)
    for bucket_mb, overlap, rs_impl, clip in [
        (40 * 4 / 2**20, True, "auto", None),
        (1.0, True, "all_reduce", 0.05),  # one bucket; the gloo fallback path; clipping
        (90 * 4 / 2**20, False, "auto", 0.5),
        (60 * 4 / 2**20, True, "all_to_all", None),  # haillm.parallel's gloo fallback
    ]:
        ddp, opt = case_fp32_equals_torch_adamw(bucket_mb, overlap, rs_impl, clip)
    case_optimizer_bytes(ddp, opt)
    case_state_dict_roundtrip(ddp, opt)
    case_bf16_equals_mixed_precision_reference()
    case_bf16_equals_mixed_precision_reference(clip=0.05)
    case_overlap_event_order()
    case_loss_scaler_skips_on_inf()
    case_norm_over_model_parallel_group()
    if world > 1:
        case_naive_reference()
        case_placement_mismatch()
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_zero_distributed(world):
    seed = 1268 + world
    results = run_distributed(all_cases, world, world, seed, timeout=150, start_method="fork")
    assert results == [True] * world
