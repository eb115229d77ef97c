"""Activation recomputation (`parallel.recompute`): the same run, less memory, as planned.

* every mode gives the losses and gradients of `none`, **bitwise** in fp32 and bf16: the
  recomputed regions run the same ops on the same inputs in the same order (checkpoint
  only changes *when* a tensor exists), so single-process gradients are equal with
  `torch.equal`, and trainer runs at (1,1,1), (1,2,2), (2,2,2) and interleaved 1F1B log equal
  losses and gradient norms;
* under TP+SP, full recomputation repeats exactly the forward's 2 all-gathers and 2
  reduce-scatters per block, selective none (counted with `haillm.parallel.trace.Tracer`);
* the RNG state is restored for the recompute (a dropout inside a block draws the same mask
  twice); blocks whose inputs do not require grad still train (non-reentrant checkpoint);
* per mode, the bytes saved for backward on CPU (the `tiny` preset and a wider model) are
  within PLAN_RTOL of `haillm.trainer.plan.activation_bytes`, and full < selective < none.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haillm.parallel import ParallelDims
from haillm.parallel.trace import Tracer
from haillm.trainer import Config, DeepSeekLM, load_config, train
from haillm.trainer.cli import plan_main, train_main
from haillm.trainer.config import apply_dict
from haillm.trainer.parallelize import parallelize
from haillm.trainer.plan import activation_bytes
from haillm.trainer.recompute import checkpointed
from tests.helpers import PLAN_RTOL, run_distributed
from tests.trainer.memory import saved_bytes
from tests.trainer.test_composition import _cfg_dict, _losses_and_norms, _run_layouts

MODES = ("none", "selective", "full")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on the 2-core CI machine
    yield
    torch.set_num_threads(n)


def _micro(mode, *extra):
    return load_config("micro", overrides=["train.precision=fp32", "parallel.attention=tiled",
                                           f"parallel.recompute={mode}", *extra])


def _grads(cfg, x, *, frozen_embedding=False):
    chunks = parallelize(DeepSeekLM(cfg.model, seed=0, lazy=True), ParallelDims().build(), cfg,
                         data_parallel=False)
    model = chunks[0]
    if frozen_embedding:
        model.embed.weight.requires_grad_(False)  # the first block's input needs no grad
    loss = model(x, x)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [
    ("parallel.fused_swiglu=false",),  # the plain SwiGLU: the activation is checkpointed
    ("parallel.recompute_layers=2",),  # Megatron's "block" method: the first 2 of 4
    ("parallel.attention=reference", "parallel.fused_norm=false"),
    ("train.precision=bf16",),  # the recomputed forward reads the same bf16 weights
], ids=["plain-swiglu", "first-2-blocks", "reference-attention", "bf16"])
def test_every_mode_is_bitwise_the_same_step(extra):
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = _grads(_micro("none", *extra), x)
    assert len(ref) == len(dict(DeepSeekLM(_micro("none").model, lazy=True).named_parameters()))
    for mode in ("selective", "full"):
        loss, got = _grads(_micro(mode, *extra), x)
        assert torch.equal(loss, ref_loss), mode
        assert got.keys() == ref.keys()
        for n in ref:
            assert torch.equal(got[n], ref[n]), f"{mode}: {n}"


def test_inputs_without_grad_still_train_their_blocks():
    """A frozen embedding: the first block's input does not require grad. Non-reentrant
    checkpoint still gives the block's weights their gradients (the reentrant one would not)."""
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    _, ref = _grads(_micro("none"), x, frozen_embedding=True)
    _, got = _grads(_micro("full"), x, frozen_embedding=True)
    assert "layers.0.attn.wqkv.weight" in got and got.keys() == ref.keys()
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_rng_state_is_restored_for_the_recompute():
    """A dropout inside a recomputed region draws the same mask in forward and recompute:
    the gradients equal those of the plain function under the same seed."""
    def f(x):
        return F.dropout(x, 0.5, training=True) * x.sin()

    for wrap in (checkpointed, None):
        x = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_()
        torch.manual_seed(3)
        (checkpointed(f)(x) if wrap else f(x)).sum().backward()
        if wrap:
            got = x.grad
        else:
            assert torch.equal(got, x.grad)
    # and a whole block: its activation with a dropout, full recompute against none
    xs = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    res = []
    for mode in ("none", "full"):
        cfg = _micro(mode, "parallel.fused_swiglu=false")
        m = DeepSeekLM(cfg.model, seed=0, lazy=True)
        for b in m.layers.values():
            b.mlp.activation = lambda g, u: F.dropout(F.silu(g) * u, 0.3, training=True)
        chunks = parallelize(m, ParallelDims().build(), cfg, data_parallel=False)
        torch.manual_seed(5)
        chunks[0](xs, xs).backward()
        res.append({n: p.grad for n, p in chunks.local.named_parameters()})
    assert all(torch.equal(res[0][n], res[1][n]) for n in res[0])


def _collectives():
    """On each of 2 ranks (tp = 2, SP): comm events of one forward + backward per mode."""
    out = {}
    for mode in MODES:
        torch.set_num_threads(1)
        cfg = _micro(mode, "parallel.tp=2", "parallel.tp_comm_overlap=false")
        chunks = parallelize(DeepSeekLM(cfg.model, seed=0, lazy=True),
                             ParallelDims(tp=2).build(), cfg, data_parallel=False)
        x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        with Tracer() as tr:
            loss = chunks[0](x, x)
            n_fwd = sum(e.kind == "comm" for e in tr.events)
            loss.backward()
        names = [e.name for e in tr.events if e.kind == "comm"]
        out[mode] = (n_fwd, {n: names.count(n) for n in set(names)},
                     {k: p.grad.clone() for k, p in chunks.local.named_parameters()})
    return out


def test_sequence_parallel_recompute_repeats_only_the_forward_collectives():
    n_layers = load_config("micro").model.n_layers
    for res in run_distributed(_collectives, 2, start_method="fork", timeout=120):
        none, sel, full = (res[m] for m in MODES)
        assert sel[:2] == none[:2]  # selective: no collective inside a recomputed region
        # full: each block's forward again: wqkv and w_gate_up all-gather the sequence
        # shard they kept, wo and w_down reduce-scatter; nothing else is repeated
        assert full[0] == none[0]
        assert full[1]["all_gather"] == none[1]["all_gather"] + 2 * n_layers
        assert full[1]["reduce_scatter"] == none[1]["reduce_scatter"] + 2 * n_layers
        assert full[1]["all_reduce"] == none[1]["all_reduce"]
        for mode in (sel, full):
            assert all(torch.equal(mode[2][k], none[2][k]) for k in none[2])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tokens.bin"
    steps = np.random.default_rng(0).integers(-3, 4, size=20000)
    np.asarray(np.cumsum(steps) % 512, dtype=np.uint16).tofile(path)
    return str(path)


def _trainer_cfgs(corpus, tmp_path, tag, dp, tp, pp, extra):
    cfgs = []
    for mode in MODES:
        d = _cfg_dict(corpus, str(tmp_path / f"{tag}-{mode}"), dp, tp, pp, True)
        d["train"]["steps"] = 2
        d["parallel"].update(extra, recompute=mode)
        cfgs.append(d)
    return cfgs


def test_trainer_runs_are_identical_in_every_layout(corpus, tmp_path):
    """Losses and logged gradient norms of `none`, `selective`, `full`, exactly equal."""
    runs = {"(1,1,1)": [_losses_and_norms(train(apply_dict(Config(), d, source="t")),
                                          d["run"]["out"])
                        for d in _trainer_cfgs(corpus, tmp_path, "111", 1, 1, 1, {})]}
    layouts = {2: {"(1,1,2) interleaved, 2 chunks, first block of each":
                   (1, 1, 2, {"pipeline_schedule": "interleaved", "chunks": 2,
                              "recompute_layers": 1}),
                   # the recomputed ring attention re-runs its K/V exchange on every CP rank
                   "cp=2 (ring attention)": (1, 1, 1, {"cp": 2})},
               4: {"(1,2,2) TP+SP, 1F1B": (1, 2, 2, {})},
               8: {"(2,2,2) TP+SP, 1F1B, ZeRO-1": (2, 2, 2, {})}}
    for world, named in layouts.items():
        cfgs = []
        for i, (dp, tp, pp, extra) in enumerate(named.values()):
            cfgs += _trainer_cfgs(corpus, tmp_path, f"w{world}-{i}", dp, tp, pp, extra)
        res = run_distributed(_run_layouts, world, cfgs, timeout=300, start_method="fork")[0]
        for i, name in enumerate(named):
            runs[name] = res[3 * i:3 * i + 3]
    for name, (none, sel, full) in runs.items():
        assert len(none[0]) == 2 and all(np.isfinite(none[0]))
        assert sel == none and full == none, f"{name}: {none} {sel} {full}"


def _measure_modes(preset, *extra):
    out = {}
    for mode in MODES:
        cfg = load_config(preset, overrides=["train.precision=fp32", f"parallel.recompute={mode}",
                                             "parallel.microbatches=1", "train.global_batch=2",
                                             *extra])
        chunks = parallelize(DeepSeekLM(cfg.model, seed=0, lazy=True), ParallelDims().build(),
                             cfg, data_parallel=False)
        x = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len),
                          generator=torch.Generator().manual_seed(0))
        measured, _ = saved_bytes(chunks[0], x, x)
        out[mode] = (measured, activation_bytes(cfg, cfg.model.n_layers, first=True, last=True))
    return out


@pytest.mark.parametrize("preset, extra", [
    ("tiny", ()),  # the CPU defaults: fused ops on (their PyTorch paths), tiled attention
    ("tiny", ("parallel.fused_swiglu=false", "parallel.attention=reference")),
    ("tiny", ("model.hidden_size=512", "model.intermediate_size=1376", "model.n_heads=8",
              "model.n_kv_heads=8", "model.vocab_size=1024", "model.seq_len=64")),
], ids=["tiny", "tiny-plain", "wide"])
def test_saved_activation_memory_per_mode_matches_the_plan(preset, extra):
    res = _measure_modes(preset, *extra)
    for mode, (measured, planned) in res.items():
        assert planned == pytest.approx(measured, rel=PLAN_RTOL), mode
    assert res["full"][0] < res["selective"][0] < res["none"][0]


def test_recompute_flag_errors_are_one_line(capsys, tmp_path):
    assert train_main(["--preset", "micro", "--recompute", "foo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["haillm-train: error: parallel.recompute must be one of none, selective, "
                   "full, got 'foo'"]
    assert plan_main(["--recompute", "sometimes"]) == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert plan_main(["--recompute-layers", "-1", "--recompute", "full"]) == 2
    assert "recompute_layers must be >= 0" in capsys.readouterr().err
    for mode in MODES:
        assert plan_main(["--preset", "deepseek-67b", "--dp", "8", "--tp", "8", "--pp", "4",
                          "--microbatches", "16", "--recompute", mode]) == 0
        out = capsys.readouterr().out
        assert "activations/micro-batch GiB" in out
        assert ("recompute workspace GiB" in out) == (mode == "full")
