"""haillm-plan against memory measured in tiny CPU runs (within PLAN_RTOL = 15 %).

Model states: the bytes of the real tensors (the flat parameter buffer, the fp32 main-grad
buffer, the ZeRO-1 master/Adam shards) of `parallelize`'s chunks + `haillm.trainer.optim.
Optimizer`. Activations: the bytes of every distinct storage that autograd saves for backward
during one micro-batch's forward (`torch.autograd.graph.saved_tensors_hooks`, parameters
excluded; `tests/trainer/memory.py`).
"""

from __future__ import annotations

import pytest
import torch

from haillm.parallel import ParallelDims, split_sequence
from haillm.trainer import DeepSeekLM, load_config
from haillm.trainer.cli import plan_main
from haillm.trainer.optim import Optimizer
from haillm.trainer.parallelize import parallelize
from haillm.trainer.plan import (
    activation_bytes,
    plan,
    plan_config,
    ring_workspace,
    state_bytes,
)
from tests.helpers import PLAN_RTOL, run_distributed
from tests.trainer.memory import saved_bytes

B = 2


def _cfg(dp=1, tp=1, pp=1, sp=False, attention="reference", recompute="none", n_layers=3,
         extra=(), cp=1):
    return load_config("micro", overrides=[
        f"model.n_layers={n_layers}", f"parallel.attention={attention}",
        "parallel.fused_swiglu=false", "train.precision=fp32", "model.seq_len=32",
        f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}",
        f"parallel.sequence_parallel={sp}", "parallel.microbatches=1", f"parallel.cp={cp}",
        f"train.global_batch={B * dp}", f"parallel.recompute={recompute}", *extra])


def measure(cfg, *, states=True):
    """On this rank: (measured states, planned states, measured acts, planned acts)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    m, p = cfg.model, cfg.parallel
    dims = ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp).build()
    chunks = parallelize(DeepSeekLM(m, seed=0, lazy=True), dims, cfg, data_parallel=states)
    measured = planned = None
    if states:
        opt = Optimizer(chunks, cfg.train)
        measured = {"params": opt.zdp.param_buffer.nbytes, "grads": opt.zdp.main_grad.nbytes,
                    "optimizer": opt.state_bytes()}
        planned = state_bytes(cfg, dims.pp_rank)
    chunk = chunks[0]
    g = torch.Generator().manual_seed(1)
    x = y = torch.randint(0, m.vocab_size, (B, m.seq_len), generator=g)
    if p.cp > 1:  # this CP rank's zigzag chunks of the same sequences, (B, S/cp)
        x = y = split_sequence(x, dim=1, group=dims.cp_group, load_balance=True)
    if not dims.is_first_stage:
        x = torch.randn(B, x.shape[1] // chunk.seq_shards, m.hidden_size, requires_grad=True)
    acts, _ = saved_bytes(chunk, x, y if dims.is_last_stage else None)
    act_plan = activation_bytes(cfg, len(chunk.layers), first=dims.is_first_stage,
                                last=dims.is_last_stage)
    if dist.is_initialized():
        dist.barrier()
    return measured, planned, acts, act_plan


def _check(res, what):
    measured, planned, acts, act_plan = res
    if measured is not None:
        for k in ("params", "grads", "optimizer"):
            assert planned[k] == pytest.approx(measured[k], rel=PLAN_RTOL), f"{what}: {k}"
    assert act_plan == pytest.approx(acts, rel=PLAN_RTOL), f"{what}: activations {act_plan} " \
        f"planned, {acts} measured"


@pytest.mark.parametrize("attention", ["reference", "tiled"])
def test_plan_matches_single_process_tensors(attention):
    """`reference` attention saves the probabilities; `tiled` (flash) only O and the LSE."""
    _check(measure(_cfg(attention=attention)), f"(1,1,1) {attention}")


def _layouts():
    out = []
    for dp, tp, pp, sp, attn in ((2, 1, 1, False, "reference"), (1, 2, 1, True, "reference"),
                                 (1, 2, 1, False, "reference"), (1, 1, 2, False, "reference"),
                                 (1, 2, 1, True, "tiled")):
        out.append(((dp, tp, pp, sp, attn), measure(_cfg(dp, tp, pp, sp, attn))))
    return out


def test_plan_matches_distributed_tensors():
    """ZeRO-1 sharding over DP, TP with and without SP, and the PP split, on 2 gloo ranks."""
    for rank_res in run_distributed(_layouts, 2, start_method="fork", timeout=120):
        for lay, res in rank_res:
            _check(res, str(lay))


def ring_peak(cfg) -> int:
    """On this rank: the most bytes of ring buffers alive at once during one forward +
    backward of the model (fp32, pp = 1).

    Every K/V block and dK/dV accumulator of `context_parallel_attention` passes through
    `_Ring.exchange` (as the tensor sent or the buffer received), so a wrapper that keeps a
    weak reference to each sees them all, and at every exchange sums the ones still alive."""
    import weakref

    from haillm.parallel.context import _Ring

    torch.set_num_threads(1)
    m, p = cfg.model, cfg.parallel
    dims = ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp).build()
    chunk = parallelize(DeepSeekLM(m, seed=0, lazy=True), dims, cfg, data_parallel=False)[0]
    x = torch.randint(0, m.vocab_size, (B, m.seq_len), generator=torch.Generator().manual_seed(1))
    x = split_sequence(x, dim=1, group=dims.cp_group, load_balance=True)
    refs, peak, exchange = {}, [0], _Ring.exchange

    def tracked(self, t, tag):
        buf, pending = exchange(self, t, tag)
        refs[id(t)], refs[id(buf)] = weakref.ref(t), weakref.ref(buf)
        peak[0] = max(peak[0], sum(r().nbytes for r in refs.values() if r() is not None))
        return buf, pending

    _Ring.exchange = tracked  # a forked rank: the parent's class is untouched
    try:
        chunk(x, x).backward()
    finally:
        _Ring.exchange = exchange
    return peak[0]


def _cp_layouts(world):
    """(dp, cp, tp, sp, attention) layouts with cp > 1 on `world` ranks, measured per rank;
    then (cp, tp, sp): the ring buffers' peak against `ring_workspace`."""
    lays = {2: ((1, 2, 1, False, "tiled"), (1, 2, 1, False, "reference")),
            4: ((1, 2, 2, True, "tiled"), (2, 2, 1, False, "tiled"))}[world]
    out = [(lay, measure(_cfg(dp=lay[0], cp=lay[1], tp=lay[2], sp=lay[3], attention=lay[4])))
           for lay in lays]
    rings = {2: ((2, 1, False),), 4: ((4, 1, False), (2, 2, True))}[world]
    for cp, tp, sp in rings:
        cfg = _cfg(cp=cp, tp=tp, sp=sp, dp=world // (cp * tp), attention="tiled")
        out.append(((cp, tp, sp), (ring_peak(cfg), ring_workspace(cfg))))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_plan_matches_context_parallel_tensors(world):
    """CP on 2 gloo ranks (tiled blocks, and reference blocks: the ring saves no scores),
    cp 2 x tp 2 with SP and cp 2 x dp 2 (ZeRO-1 over the 4 dp x cp ranks) on 4: every
    per-token term at s/cp, attention's q, k, v, O, lse. The ring workspace (two K/V blocks,
    two fp32 dK/dV accumulators) at cp = 2, 4 and cp 2 x tp 2: exact."""
    for rank_res in run_distributed(_cp_layouts, world, world, start_method="fork",
                                    timeout=120):
        for lay, res in rank_res:
            if len(res) == 2:
                assert res[0] == res[1], f"ring buffers (cp, tp, sp) = {lay}: {res[0]} " \
                    f"measured at peak, {res[1]} planned"
            else:
                _check(res, f"(dp, cp, tp, sp, attention) = {lay}")


def test_plan_formulas_and_1f1b_depth():
    cfg = plan_config("deepseek-67b", dp=8, tp=8, pp=4, microbatches=16)
    p = plan(cfg)
    assert [x.in_flight for x in p] == [4, 3, 2, 1]  # 1F1B: stage i holds pp - i
    assert p[0].optimizer == pytest.approx(12 * p[0].n_params / 8)
    assert p[0].grads == 4 * p[0].n_params and p[0].params == 2 * p[0].n_params
    no_sp = plan(plan_config("deepseek-67b", dp=8, tp=8, pp=4, microbatches=16,
                             sequence_parallel=False))
    assert no_sp[0].activations > p[0].activations  # SP shards the norms' activations
    # whole model over all stages = the config's parameter count (TP shards recombined)
    total = sum(x.n_params for x in plan(plan_config("deepseek-67b", pp=5)))
    assert total == cfg.model.n_params()
    # the micro-batch comes from the config: twice the sequences, twice the activations, but
    # for RoPE's cos and sin (S, head_dim) fp32, shared by the sequences (integers: exact)
    two = plan(plan_config("deepseek-67b", dp=8, tp=8, pp=4, microbatches=16,
                           micro_batch_size=2))
    rope = 2 * 4 * cfg.model.seq_len * cfg.model.head_dim
    assert two[0].activations_per_microbatch - rope == 2 * (p[0].activations_per_microbatch - rope)
    assert two[0].activations == two[0].in_flight * two[0].activations_per_microbatch


def test_plan_cli(capsys):
    assert plan_main(["--preset", "deepseek-7b", "--dp", "8", "--microbatches", "4"]) == 0
    out = capsys.readouterr().out
    assert "optimizer (12Ψ/N_d)" in out and "activations" in out
    assert plan_main(["--preset", "deepseek-67b", "--tp", "3"]) == 2
    assert "n_heads (64) must be divisible by tp (3)" in capsys.readouterr().err
    for argv in (["--no-sp", "--no-zero", "--attention", "plain", "--precision", "fp32",
                  "--seq-len", "64", "--micro-batch-size", "2", "--pp", "2"],):
        assert plan_main(["--preset", "tiny", *argv]) == 0
        assert "SP off, ZeRO-1 off" in capsys.readouterr().out


def test_plan_context_parallel_formulas_and_cli(capsys):
    """cp divides the per-token activations and the ZeRO-1 shard, multiplies the world; the
    ring workspace is the derived formula; the seq_len rules are Config.validate's."""
    base = plan_config("deepseek-67b", dp=2, tp=8, pp=4, microbatches=8, seq_len=32768)
    cp4 = plan_config("deepseek-67b", dp=2, tp=8, pp=4, cp=4, microbatches=8, seq_len=32768)
    p1, p4 = plan(base)[0], plan(cp4)[0]
    assert p4.activations_per_microbatch == pytest.approx(p1.activations_per_microbatch / 4)
    assert p4.optimizer == pytest.approx(p1.optimizer / 4)  # ZeRO-1 over dp x cp = 8 ranks
    assert p4.params == p1.params and p4.grads == p1.grads  # replicated over cp
    assert p4.flops_per_step == p1.flops_per_step  # the same sequences...
    assert p4.flops_per_rank == pytest.approx(p1.flops_per_rank / 4)  # ...on 4x the ranks
    m = cp4.model  # bf16: two K/V shards, two fp32 dK/dV, the fp32 dQ accumulator
    kv = 2 * (32768 // 4) * m.n_kv_heads * m.head_dim / 8
    assert p4.ring_workspace == 2 * kv * 2 + 2 * kv * 4 + 4 * (32768 // 4) * m.hidden_size / 8
    assert p4.activations == pytest.approx(p4.in_flight * p4.activations_per_microbatch
                                           + p4.ring_workspace)
    assert p1.ring_workspace == 0
    # plain attention under CP: the ring saves no scores, so it plans as flash
    plain = plan_config("deepseek-67b", tp=8, pp=4, cp=4, seq_len=32768, attention="plain")
    assert plan(plain)[0].activations_per_microbatch == plan(
        plan_config("deepseek-67b", tp=8, pp=4, cp=4, seq_len=32768))[0].activations_per_microbatch
    assert plan_main(["--preset", "tiny", "--cp", "2", "--tp", "2", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "cp=2" in out and "ring workspace" in out
    for argv, err in ((["--cp", "3", "--seq-len", "64"], "divisible by 2*cp = 6"),
                      (["--cp", "2", "--tp", "4", "--seq-len", "12"], "divisible by cp*tp = 8"),
                      (["--cp", "0"], "--cp must be >= 1")):
        assert plan_main(["--preset", "deepseek-7b", *argv]) == 2
        assert err in capsys.readouterr().err
