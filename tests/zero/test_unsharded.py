"""ZeroDataParallel(shard=False): plain data parallelism on ZeRO's buffers; the float64 norm.

All cases of one world size run inside ONE `run_distributed` (gloo ranks forked from pytest),
as in `test_distributed.py`, whose model, data and training loop they reuse.

What is compared, and how exactly:

* unsharded vs sharded with ``reduce_scatter="all_reduce"``: both modes have the same bucket
  boundaries, so both issue the same all-reduce calls on the same buckets, scale by the same
  1/N_d, and run the same element-wise AdamW on each element: **bitwise** equal parameters and
  optimizer state (without clipping: the clip factor comes from the norm, whose float64 sum
  runs in another order).
* unsharded vs sharded with the native reduce-scatter: bitwise at N_d = 2 (a two-term sum is
  commutative in IEEE arithmetic, whichever rank adds); at N_d = 4 the collectives add in other
  orders, and each mode is held to the step-by-step bounds below instead.
* vs one process with `torch.optim.AdamW` on the whole batch, every mode, every step, from the
  same state (`tests/zero/lockstep.py`): the gradient to the low-precision rule against the
  float64 truth, the norm to the triangle inequality, p / m / v to `adamw_exact`.
* the gradient norm on *the same* gradients (written into the main-grad buffers so that the
  DP average is exact: rank 0 holds N_d·G, the others 0, N_d a power of two): every DP size,
  mode and bucket layout within `norm_rtol(n, float64)` (1.1e-13) of ``clip_grad_norm_`` in float64 (so within
  twice that of each other across the 1-, 2- and 4-rank runs); the old fp32 accumulation misses
  that bound on the same data (checked, so the test can fail).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, inherited by the forked ranks
import torch.distributed as dist
from torch import nn

from haillm.zero import Zero1AdamW, ZeroDataParallel, memory_per_rank, weight_decay_groups
from haillm.zero.memory import measured_bytes
from tests.helpers import norm_rtol, run_distributed
from tests.zero.lockstep import TorchAdamWLockstep
from tests.zero.test_distributed import case_overlap_event_order, loss_fn, make_model, train_zero

# float64 sums of the same values in two orders, for the largest model here (15056 values): 1.1e-13
# (seen: <= 4e-16; fp32 accumulation: 1.5e-7)
NORM_RTOL = norm_rtol(15056, torch.float64)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _build(dims, shard, *, rs="auto", dtype=torch.float32, precision="fp32", bucket_mb=None,
           clip=None, seed=0, lr=1e-2):
    ddp = ZeroDataParallel(make_model(dtype, seed=seed, dims=dims),
                           bucket_mb=bucket_mb or 50 * 4 / 2**20, shard=shard, reduce_scatter=rs)
    groups = weight_decay_groups(ddp, 0.1)
    groups[1]["lr"] = lr / 3  # per-group learning rate
    return ddp, Zero1AdamW(ddp, lr=lr, precision=precision, param_groups=groups,
                           max_grad_norm=clip)


def _assert_same_full_state(a, b):
    fa, fb = a.full_state_dict(), b.full_state_dict()
    assert fa["num_steps"] == fb["num_steps"] and fa["param_groups"] == fb["param_groups"]
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert fa[key].keys() == fb[key].keys()
        for name in fa[key]:
            x, y = fa[key][name], fb[key][name]
            assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
            assert torch.equal(x, y), (key, name)


def _same_on_every_rank(t):
    """Nobody all-gathers unsharded parameters: every rank must have computed the same ones."""
    ref = t.clone()
    dist.broadcast(ref, src=0)
    assert torch.equal(t, ref), "unsharded ranks diverged"


def case_steps_equal_sharded_and_reference(dims, bucket_mb, micro=2, steps=3, clip=None):
    """Each mode, every step, against torch.optim.AdamW on the whole batch from the same state
    (tests/zero/lockstep.py); and the modes against each other bit for bit where they add the
    same numbers in the same order."""
    dp = dist.get_world_size()
    runs = {}
    for name, shard, rs in (("unsharded", False, "auto"), ("sharded_ar", True, "all_reduce"),
                            ("sharded", True, "auto")):
        ddp, opt = _build(dims, shard, rs=rs, bucket_mb=bucket_mb, clip=clip)
        check = TorchAdamWLockstep(ddp, opt, lambda: make_model(dims=dims), loss_fn, clip)
        norms = [r.grad_norm for r in train_zero(ddp, opt, steps, micro, torch.float32, dims=dims,
                                                 lockstep=check)]
        runs[name] = ddp, opt, norms
    (u, uo, un), (a, ao, an), (s, _, sn) = runs["unsharded"], runs["sharded_ar"], runs["sharded"]
    assert not u.shard and u.layout.dp == 1 and uo.sharded is False
    _same_on_every_rank(_flat(u.module))
    # Bitwise only without clipping: the clip factor comes from the norm, whose float64 sum
    # runs in another order (with clipping each mode is held to the lockstep bounds alone).
    if clip is None:
        assert torch.equal(_flat(u.module), _flat(a.module))
        _assert_same_full_state(uo, ao)
    # the same gradients (clipped: only at step 0, later the parameters differ), so only the
    # float64 sum order of the norm differs
    for x, y in zip(un if clip is None else un[:1], an):
        assert abs(x - y) <= NORM_RTOL * y, (x, y)
    if dp <= 2 and clip is None:
        assert torch.equal(_flat(u.module), _flat(s.module))
        assert all(abs(x - y) <= NORM_RTOL * y for x, y in zip(un, sn)), (un, sn)
    return u, uo, a, ao


def case_full_state_on_every_rank(dims, u, uo, a, ao):
    """Unsharded: master (bf16) / m / v of every element on every rank; sharded: 1/N_d."""
    dp = dist.get_world_size()
    L, La = u.layout, a.layout
    assert (L.dp, L.rank, L.shard_numel) == (1, 0, L.numel)
    # the same offsets and bucket boundaries as the sharded mode (hence the same all-reduces)
    assert L.param_offsets == La.param_offsets and L.numel == La.numel
    assert [(b.start, b.numel) for b in L.buckets] == [(b.start, b.numel) for b in La.buckets]
    psi = sum(p.numel() for p in u.module.parameters())
    assert [t.numel() for t in uo.state_tensors()] == [L.numel] * 2  # fp32: m, v
    assert [t.numel() for t in ao.state_tensors()] == [La.numel // dp] * 2
    assert uo.master.numel() == L.numel
    assert len(u.shard_grad_views()) == len(L.buckets)
    assert sum(g.numel() for g in u.shard_grad_views()) == L.numel
    got = measured_bytes(u, uo)
    want = memory_per_rank(psi, dp, param_bytes=4, shard=False)
    assert got["optimizer"] == want["optimizer"] + 8 * L.padding
    assert got["grads"] == want["grads"] + 4 * L.padding
    bf, bfo = _build(dims, False, dtype=torch.bfloat16, precision="bf16")
    assert [t.numel() for t in bfo.state_tensors()] == [bf.layout.numel] * 3  # master, m, v
    want = memory_per_rank(psi, dp, shard=False)
    assert measured_bytes(bf, bfo)["optimizer"] == want["optimizer"] + 12 * bf.layout.padding
    assert want["optimizer"] == 12 * psi


def case_bf16_unsharded_equals_sharded(dims, micro=2, steps=2):
    out = []
    for shard, rs in ((False, "auto"), (True, "all_reduce")):
        ddp, opt = _build(dims, shard, rs=rs, dtype=torch.bfloat16, precision="bf16",
                          bucket_mb=30 * 4 / 2**20)
        train_zero(ddp, opt, steps, micro, torch.bfloat16, dims=dims)
        out.append((ddp, opt))
    (u, uo), (a, ao) = out
    assert torch.equal(u.param_buffer, a.param_buffer) and u.param_dtype == torch.bfloat16
    _assert_same_full_state(uo, ao)
    _same_on_every_rank(u.param_buffer.float())


def case_checkpoints_across_modes(dims):
    dp = dist.get_world_size()
    a, ao = _build(dims, True, rs="all_reduce")
    train_zero(a, ao, 2, 2, torch.float32, dims=dims)
    # sharded -> unsharded (a model built from other weights: everything must be loaded)
    u, uo = _build(dims, False, seed=7, lr=1.0)
    uo.load_full_state_dict(ao.full_state_dict())
    assert torch.equal(_flat(u.module), _flat(a.module))
    _assert_same_full_state(uo, ao)
    train_zero(a, ao, 1, 2, torch.float32, dims=dims)  # and they go on identically
    train_zero(u, uo, 1, 2, torch.float32, dims=dims)
    assert torch.equal(_flat(u.module), _flat(a.module))
    # unsharded -> sharded, into another bucket layout
    s, so = _build(dims, True, seed=7, lr=1.0, bucket_mb=1.0)
    so.load_full_state_dict(uo.full_state_dict())
    _assert_same_full_state(so, uo)
    assert torch.equal(_flat(s.module), _flat(u.module))
    # the per-rank format stays within a mode
    sd = uo.state_dict()
    assert sd["shard"] is False and sd["dp_size"] == 1
    u2, uo2 = _build(dims, False, seed=7, lr=1.0)
    uo2.load_state_dict(sd)
    _assert_same_full_state(uo2, uo)
    if dp > 1:
        with pytest.raises(ValueError, match="full_state_dict"):
            ao.load_state_dict(sd)
        with pytest.raises(ValueError, match="full_state_dict"):
            uo2.load_state_dict(ao.state_dict())


# ---------------------------------------------------------------------- the float64 norm
def _grads(model, seed):
    """One fp32 gradient per parameter, magnitudes spread over ~10 decades (2^±16 times a
    normal draw): the squares then span ~20, where an fp32 sum visibly rounds."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=g)
            * torch.empty(p.shape).uniform_(-8, 8, generator=g).exp2().pow(2)
            for name, p in model.named_parameters()}


def _set_main_grads(ddp, grads):
    """Make the DP-averaged main gradients exactly `grads`: rank 0 contributes N_d·G, the
    others 0 (N_d a power of two: the scaling, the sum with zeros and the 1/N_d are exact)."""
    assert ddp.dp & (ddp.dp - 1) == 0
    ddp.zero_grad()
    with torch.no_grad():
        for name, g in grads.items():
            ddp.main_grad_of(name).copy_(g * ddp.dp if ddp.dp_rank == 0 else torch.zeros_like(g))


def fp64_reference_norm(grads):
    ps = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g.double()
    return torch.nn.utils.clip_grad_norm_(ps, float("inf")).item()


def fp32_accumulated_norm(grads):
    """What the norm was before: per-run fp32 norms, squared and summed in fp32."""
    sq = torch.stack([torch.linalg.vector_norm(g.reshape(-1)) for g in grads.values()]) ** 2
    return math.sqrt(sq.sum().item())


def case_norm_is_layout_independent(dims=(33, 97, 21), seed=5):
    model = make_model(dims=dims)
    grads = _grads(model, seed)
    ref = fp64_reference_norm(grads)
    assert abs(fp32_accumulated_norm(grads) - ref) > NORM_RTOL * ref  # fp32 would fail here
    norms = {}
    for name, shard, rs, mb in (("sharded", True, "auto", 40 * 4 / 2**20),
                                ("sharded_one_bucket", True, "auto", 1.0),
                                ("sharded_ar", True, "all_reduce", 333 * 4 / 2**20),
                                ("unsharded", False, "auto", 40 * 4 / 2**20),
                                ("unsharded_one_bucket", False, "auto", 1.0)):
        ddp, opt = _build(dims, shard, rs=rs, bucket_mb=mb)
        _set_main_grads(ddp, grads)
        norm, found_inf = opt.grad_norm_and_found_inf()
        assert not found_inf
        norms[name] = norm
        if not shard:  # the DP average is exactly G, everywhere
            for n, g in grads.items():
                assert torch.equal(ddp.main_grad_of(n), g), n
        # an inf on one rank only: every rank finds it and skips (unsharded: it arrives with the
        # all-reduced gradients, not with the norm's all-reduce, which skips DP)
        _set_main_grads(ddp, grads)
        if ddp.dp_rank == ddp.dp - 1:
            ddp.main_grad_of("3.weight")[0, 0] = float("inf")
        before = ddp.param_buffer.clone()
        res = opt.step()
        assert res.skipped and torch.equal(ddp.param_buffer, before), name
    for name, n in norms.items():
        assert abs(n - ref) <= NORM_RTOL * ref, (name, n, ref, abs(n - ref) / ref)
    return norms


def case_norm_over_tp_and_dp():
    """World 4 as DP 2 x "TP" 2 (rank = dp_rank·2 + tp_rank): a TP-sharded weight, a replicated
    norm counted on TP rank 0 only; both modes give the fp64 norm of the whole model."""
    r = dist.get_rank()
    tp_rank, dp_rank = r % 2, r // 2
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp_group, dp_group = tp_groups[dp_rank], dp_groups[tp_rank]

    def model():
        torch.manual_seed(tp_rank)
        shard = nn.Linear(40, 30, bias=False)  # different on each TP rank, equal across DP
        torch.manual_seed(99)
        return nn.Sequential(shard, nn.LayerNorm(30))

    def grads(t):  # TP rank t's gradients (the replicated norm's differ too: counted once?)
        return _grads(model(), 11 + t)

    expected = math.sqrt(sum(fp64_reference_norm({"0.weight": grads(t)["0.weight"]}) ** 2
                             for t in range(2))
                         + fp64_reference_norm({k: v for k, v in grads(0).items()
                                                if k.startswith("1.")}) ** 2)
    for shard in (True, False):
        ddp = ZeroDataParallel(model(), dp_group=dp_group, shard=shard, bucket_mb=300 * 4 / 2**20)
        opt = Zero1AdamW(ddp, lr=1e-2, precision="fp32", model_parallel_groups=[tp_group],
                         count_in_norm=lambda name, p: name.startswith("0.") or tp_rank == 0)
        _set_main_grads(ddp, grads(tp_rank))
        norm, found_inf = opt.grad_norm_and_found_inf()
        assert not found_inf and abs(norm - expected) <= NORM_RTOL * expected, (shard, norm,
                                                                                 expected)


def all_cases(world, seed):
    g = torch.Generator().manual_seed(seed)
    for clip in (None, None, 0.05):  # random odd shapes; the last one clipped
        d_in, d_hid, d_out = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
        dims = (d_in, max(d_hid, 3), d_out)
        bucket = int(torch.randint(1, 200, (1,), generator=g)) * 4 / 2**20
        u, uo, a, ao = case_steps_equal_sharded_and_reference(dims, bucket, clip=clip)
    case_full_state_on_every_rank(dims, u, uo, a, ao)
    case_bf16_unsharded_equals_sharded((7, 13, 5))
    case_checkpoints_across_modes((7, 13, 5))
    case_overlap_event_order(shard=False)
    norms = case_norm_is_layout_independent()
    if world == 4:
        case_norm_over_tp_and_dp()
    return norms


@pytest.mark.parametrize("world", [1, 2, 4])
def test_unsharded_distributed(world):
    results = run_distributed(all_cases, world, world, 4409 + world, timeout=150,
                              start_method="fork")
    assert all(r == results[0] for r in results)  # the same norms on every rank
