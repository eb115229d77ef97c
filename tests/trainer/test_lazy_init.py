"""Per-parameter seeded initialisation: a lazy model materialised piece by piece equals the
eager one, and building a pipeline stage never allocates other stages' layers."""

from __future__ import annotations

import gc
import weakref

import torch

from haillm.parallel import ParallelDims
from haillm.trainer import DeepSeekLM, load_config
from haillm.trainer.model import _draw, init_value
from haillm.trainer.parallelize import materialize, split_pipeline
from haillm.trainer.shard_plan import param_specs


def _model_cfg():
    return load_config("micro", overrides=["model.n_layers=4", "model.n_kv_heads=2",
                                           "train.precision=fp32"])


def test_lazy_materialisation_equals_eager_in_any_order():
    m = _model_cfg().model
    eager = DeepSeekLM(m, seed=7).state_dict()
    lazy = DeepSeekLM(m, seed=7, lazy=True)
    assert all(p.is_meta for p in lazy.parameters())
    names = list(eager)
    order = names[::-1][::2] + names[::-1][1::2]  # any order
    got = {n: init_value(m, 7, n) for n in order}
    lazy.materialize_()
    assert lazy.state_dict().keys() == eager.keys()
    for k in eager:
        assert torch.equal(got[k], eager[k]) and torch.equal(lazy.state_dict()[k], eager[k]), k
    other = DeepSeekLM(m, seed=8).state_dict()
    assert not torch.equal(other["layers.0.attn.wqkv.weight"], eager["layers.0.attn.wqkv.weight"])
    # a merged weight is its parts drawn under their own names (GQA: unequal widths), so the
    # values do not depend on whether Q, K, V are one GEMM or three
    spec = param_specs(m)["layers.2.attn.wqkv.weight"]
    assert [r for _, r in spec.parts] == [m.hidden_size, m.hidden_size // 2, m.hidden_size // 2]
    q, k, v = eager["layers.2.attn.wqkv.weight"].split([r for _, r in spec.parts])
    assert torch.equal(k, _draw(m, 7, "layers.2.attn.wk.weight", k.shape))
    assert not torch.equal(k, v)
    # every weight is drawn independently: no two parameters of equal shape coincide
    assert not torch.equal(eager["layers.0.mlp.w_gate_up.weight"],
                           eager["layers.1.mlp.w_gate_up.weight"])
    assert abs(q.std().item() - m.init_std) < 0.1 * m.init_std
    assert torch.equal(eager["layers.1.attn_norm.weight"], torch.ones(m.hidden_size))


def _build_stage(m, pp, rank, seed, dtype):
    """Split a lazy model as pipeline stage `rank` of `pp`, materialise it; record how many
    full source tensors were alive at once and which names were drawn."""
    dims = ParallelDims(pp=pp, world_size=pp, rank=rank)  # arithmetic only: no processes
    cfg = load_config("micro")
    chunks, local = split_pipeline(DeepSeekLM(m, seed=seed, lazy=True), dims, cfg.parallel)
    alive: list = []
    drawn: list[str] = []
    peak = {"n": 0}

    def source(name):
        # full tensors still alive that are not the storage of a parameter (in fp32 a
        # parameter may *be* its source tensor, which costs nothing extra)
        gc.collect()
        held = {p.untyped_storage().data_ptr() for p in local.parameters() if not p.is_meta}
        alive[:] = [r for r in alive if r() is not None
                    and r().untyped_storage().data_ptr() not in held]
        t = init_value(m, seed, name)
        alive.append(weakref.ref(t))
        peak["n"] = max(peak["n"], len(alive))
        drawn.append(name)
        return t

    materialize(local, dims, dtype=dtype, source=source)
    return chunks, local, drawn, peak["n"]


def test_stage_materialises_only_its_own_layers_one_tensor_at_a_time():
    m = _model_cfg().model
    chunks, local, drawn, peak = _build_stage(m, pp=2, rank=1, seed=3, dtype=torch.float32)
    assert local.embed is None and local.head is not None
    assert sorted({n.split(".")[1] for n in drawn if n.startswith("layers.")}) == ["2", "3"]
    assert peak == 1  # one full tensor at a time: the source's is freed before the next
    eager = dict(DeepSeekLM(m, seed=3).named_parameters())
    for n, p in local.named_parameters():
        assert torch.equal(p, eager[n]), n


def test_a_7b_stage_builds_in_one_layer_of_memory():
    """A middle stage of DeepSeek-7B at pp = 30: one decoder layer's parameters drawn and
    held (in bf16), never a second layer's, never the embedding or the head; at most one full
    fp32 tensor exists at a time (the 7B build stays within a layer + one tensor)."""
    m = load_config("deepseek-7b").model
    chunks, local, drawn, peak = _build_stage(m, pp=30, rank=5, seed=0, dtype=torch.bfloat16)
    assert m.n_layers == 30 and list(chunks[0].layers) == ["5"]
    specs = param_specs(m)
    layer = [n for n in specs if n.startswith("layers.5.")]
    assert sorted(drawn) == sorted(layer)
    assert peak == 1
    held = sum(p.numel() * p.element_size() for p in local.parameters())
    one_layer = sum(torch.Size(specs[n].shape).numel() for n in layer) * 2  # bf16
    assert held == one_layer
    assert all(p.dtype == torch.bfloat16 for p in local.parameters())
