"""haillm-plan against memory measured in tiny CPU runs (within 15 %).

Model states: the bytes of the real tensors (the flat parameter buffer, the fp32 main-grad
buffer, the ZeRO-1 master/Adam shards) of a `StageModel` + `haillm.zero` optimizer. Activations:
the bytes of every distinct storage that autograd saves for backward during one micro-batch's
forward (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded.
"""

from __future__ import annotations

import pytest
import torch

from haillm.trainer import DeepSeekLM, StageModel, load_config, split_layers
from haillm.trainer.cli import plan_main
from haillm.trainer.grid import Grid
from haillm.trainer.ops import Ops
from haillm.trainer.optim import make_optimizer
from haillm.trainer.plan import Layout, activation_bytes, plan, state_bytes
from tests.helpers import PLAN_RTOL, run_distributed

B = 2


def _cfg(n_layers=3, attention="reference"):
    return load_config("micro", overrides=[
        f"model.n_layers={n_layers}", f"parallel.attention={attention}",
        "parallel.fused_swiglu=false", "train.precision=fp32", "model.seq_len=32"])


def _measure(dp, tp, pp, sp, attention="reference"):
    """On every rank: (measured states, planned states, measured acts, planned acts)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    cfg = _cfg(attention=attention)
    m = cfg.model
    grid = Grid.create(dp, tp, pp)
    ops = Ops(cfg.parallel, warn=False)
    layers = split_layers(m.n_layers, pp)[grid.pp_rank]
    st = StageModel(DeepSeekLM(m, seed=0), layers, grid, ops, first=grid.is_first_stage,
                    last=grid.is_last_stage, sequence_parallel=sp, dtype=torch.float32)
    opt, _ = make_optimizer(st, cfg.train, grid, zero=True, overlap=True, sequence_parallel=sp)
    measured = {"params": opt.zdp.param_buffer.nbytes, "grads": opt.zdp.main_grad.nbytes,
                "optimizer": opt.state_bytes()}
    lay = Layout(dp=dp, tp=tp, pp=pp, micro_batch_size=B, precision="fp32",
                 sequence_parallel=sp, attention="plain" if attention == "reference" else "flash",
                 fused_swiglu=False)
    planned = state_bytes(m, lay, grid.pp_rank)
    params = {p.untyped_storage().data_ptr() for p in st.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    g = torch.Generator().manual_seed(1)
    x = y = torch.randint(0, m.vocab_size, (B, m.seq_len), generator=g)
    if not grid.is_first_stage:
        s_loc = m.seq_len // tp if (sp and tp > 1) else m.seq_len
        x = torch.randn(B, s_loc, m.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        st(x, y if grid.is_last_stage else None)
    act_plan = activation_bytes(m, lay, len(layers), first=grid.is_first_stage,
                                last=grid.is_last_stage)
    if dist.is_initialized():
        dist.barrier()
    return measured, planned, sum(seen.values()), act_plan


def _check(res, what):
    measured, planned, acts, act_plan = res
    for k in ("params", "grads", "optimizer"):
        assert planned[k] == pytest.approx(measured[k], rel=PLAN_RTOL), f"{what}: {k}"
    assert act_plan == pytest.approx(acts, rel=PLAN_RTOL), f"{what}: activations"


@pytest.mark.parametrize("attention", ["reference", "tiled"])
def test_plan_matches_single_process_tensors(attention):
    """`reference` attention saves the probabilities; `tiled` (flash) only O and the LSE."""
    _check(_measure(1, 1, 1, False, attention), f"(1,1,1) {attention}")


def _layouts():
    out = []
    for dp, tp, pp, sp, attn in ((2, 1, 1, False, "reference"), (1, 2, 1, True, "reference"),
                                 (1, 2, 1, False, "reference"), (1, 1, 2, False, "reference"),
                                 (1, 2, 1, True, "tiled")):
        out.append(((dp, tp, pp, sp, attn), _measure(dp, tp, pp, sp, attn)))
    return out


def test_plan_matches_distributed_tensors():
    """ZeRO-1 sharding over DP, TP with and without SP, and the PP split, on 2 gloo ranks."""
    for rank_res in run_distributed(_layouts, 2, start_method="fork", timeout=120):
        for lay, res in rank_res:
            _check(res, str(lay))


def test_plan_formulas_and_1f1b_depth():
    m = load_config("deepseek-67b").model
    lay = Layout(dp=8, tp=8, pp=4, microbatches=16)
    p = plan(m, lay)
    assert [x.in_flight for x in p] == [4, 3, 2, 1]  # 1F1B: stage i holds pp - i
    assert p[0].optimizer == pytest.approx(12 * p[0].n_params / 8)
    assert p[0].grads == 4 * p[0].n_params and p[0].params == 2 * p[0].n_params
    no_sp = plan(m, Layout(dp=8, tp=8, pp=4, microbatches=16, sequence_parallel=False))
    assert no_sp[0].activations > p[0].activations  # SP shards the norms' activations
    # whole model over all stages = the config's parameter count (TP shards recombined)
    total = sum(x.n_params for x in plan(m, Layout(tp=1, pp=5)))
    assert total == m.n_params()


def test_plan_cli(capsys):
    assert plan_main(["--preset", "deepseek-7b", "--dp", "8", "--microbatches", "4"]) == 0
    out = capsys.readouterr().out
    assert "optimizer (12Ψ/N_d)" in out and "activations" in out
    assert plan_main(["--preset", "deepseek-67b", "--tp", "3"]) == 2
    assert "n_heads (64) must be divisible by tp (3)" in capsys.readouterr().err
