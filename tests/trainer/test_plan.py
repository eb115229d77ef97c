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

from haillm.parallel import ParallelDims
from haillm.trainer import DeepSeekLM, load_config
from haillm.trainer.cli import plan_main
from haillm.trainer.optim import Optimizer
from haillm.trainer.parallelize import parallelize
from haillm.trainer.plan import activation_bytes, plan, plan_config, state_bytes
from tests.helpers import PLAN_RTOL, run_distributed
from tests.trainer.memory import saved_bytes

B = 2


def _cfg(dp=1, tp=1, pp=1, sp=False, attention="reference", recompute="none", n_layers=3,
         extra=()):
    return load_config("micro", overrides=[
        f"model.n_layers={n_layers}", f"parallel.attention={attention}",
        "parallel.fused_swiglu=false", "train.precision=fp32", "model.seq_len=32",
        f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}",
        f"parallel.sequence_parallel={sp}", "parallel.microbatches=1",
        f"train.global_batch={B * dp}", f"parallel.recompute={recompute}", *extra])


def measure(cfg, *, states=True):
    """On this rank: (measured states, planned states, measured acts, planned acts)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    m, p = cfg.model, cfg.parallel
    dims = ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp).build()
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
    if not dims.is_first_stage:
        x = torch.randn(B, m.seq_len // chunk.seq_shards, m.hidden_size, requires_grad=True)
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
    # the micro-batch comes from the config: twice the sequences, twice the activations
    two = plan(plan_config("deepseek-67b", dp=8, tp=8, pp=4, microbatches=16,
                           micro_batch_size=2))
    assert two[0].activations == pytest.approx(2 * p[0].activations, rel=1e-3)


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
