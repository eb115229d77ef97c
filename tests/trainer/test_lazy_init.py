"""Per-parameter seeded initialisation: a lazy reference materialised piece by piece equals the
eager one, and building a pipeline stage from it never keeps other stages' layers."""

from __future__ import annotations

import torch

from haillm.trainer import DeepSeekLM, StageModel, load_config
from haillm.trainer.grid import Grid
from haillm.trainer.ops import Ops


def _model_cfg():
    return load_config("micro", overrides=["model.n_layers=4", "train.precision=fp32",
                                           "parallel.attention=reference"])


def test_lazy_materialisation_equals_eager_in_any_order():
    m = _model_cfg().model
    eager = DeepSeekLM(m, seed=7).state_dict()
    lazy = DeepSeekLM(m, seed=7, lazy=True)
    assert all(p.is_meta for p in lazy.parameters())
    for prefix in ("layers.3.", "head.", "layers.0.", ""):  # any order, any subset
        lazy.materialize_(prefix)
    got = lazy.state_dict()
    assert got.keys() == eager.keys()
    for k in eager:
        assert torch.equal(got[k], eager[k]), k
    other = DeepSeekLM(m, seed=8).state_dict()
    assert not torch.equal(other["layers.0.attn.wq.weight"], eager["layers.0.attn.wq.weight"])
    # every weight is drawn independently: no two parameters of equal shape coincide
    assert not torch.equal(eager["layers.0.mlp.w_gate.weight"], eager["layers.1.mlp.w_gate.weight"])
    w = eager["layers.2.attn.wq.weight"]
    assert abs(w.std().item() - m.init_std) < 0.1 * m.init_std
    assert torch.equal(eager["layers.1.attn_norm.weight"], torch.ones(m.hidden_size))


def test_stage_from_lazy_reference_keeps_only_its_shards():
    cfg = _model_cfg()
    m = cfg.model
    ops = Ops(cfg.parallel, warn=False)
    grid = Grid.create(1, 1, 1)
    lazy = DeepSeekLM(m, seed=3, lazy=True)
    peak = {"n": 0}
    materialize = lazy.materialize_

    def counting(prefix=""):  # how many reference parameters hold memory at once
        names = materialize(prefix)
        peak["n"] = max(peak["n"], sum(not p.is_meta for p in lazy.parameters()))
        return names

    lazy.materialize_ = counting
    stage = StageModel(lazy, range(1, 3), grid, ops, first=False, last=True,
                       sequence_parallel=False)
    assert all(p.is_meta for p in lazy.parameters()), "the reference was not released"
    per_layer = len(list(lazy.layers[0].parameters()))
    assert peak["n"] == per_layer  # one layer at a time (norm and head: 2 < per_layer)
    eager = DeepSeekLM(m, seed=3)
    want = StageModel(eager, range(1, 3), grid, ops, first=False, last=True,
                      sequence_parallel=False)
    assert all(not p.is_meta for p in eager.parameters())  # an eager reference is left as is
    for (n1, a), (n2, b) in zip(stage.named_parameters(), want.named_parameters()):
        assert n1 == n2 and torch.equal(a, b), n1
