"""Whole Megatron blocks under TP (+SP) equal the single-device block, gradients included.

* MLP: column → GeLU → row (the f ... g region of Megatron-LM, figure 3a).
* A pre-norm transformer layer: LayerNorm → merged QKV (column, heads split over ranks) →
  causal attention on the local heads → output projection (row) → residual, then
  LayerNorm → MLP → residual. Under SP the LayerNorms run on sequence shards; their weight
  gradients are all-reduced over TP by the helper (or by the hooks).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from haillm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    allreduce_sequence_parallel_grads,
    gather_from_sequence_parallel_region,
    mark_sequence_parallel,
    register_sequence_parallel_grad_hooks,
    scatter_to_sequence_parallel_region,
)
from tests.helpers import assert_close, run_distributed

EXAMPLES = min(settings().max_examples, 3)


def run(fn, world_size, *args):
    return run_distributed(fn, world_size, *args, start_method="fork")


class Layer(nn.Module):
    """Single-device reference: pre-norm attention + MLP, x: (s, b, h)."""

    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h, dtype=torch.float64), nn.LayerNorm(h, dtype=torch.float64)
        self.qkv = nn.Linear(h, 3 * h, dtype=torch.float64)
        self.proj = nn.Linear(h, h, dtype=torch.float64)
        self.fc1 = nn.Linear(h, ffn, dtype=torch.float64)
        self.fc2 = nn.Linear(ffn, h, dtype=torch.float64)
        with torch.no_grad():  # not the trivial (1, 0) init: the norm grads must be tested
            for ln in (self.ln1, self.ln2):
                ln.weight.normal_()
                ln.bias.normal_()

    def forward(self, x):
        return tp_forward(self, x, heads=self.heads, qkv_split=x.shape[-1])


def attention(q, k, v, heads):
    s, b = q.shape[:2]
    q, k, v = (z.reshape(s, b, heads, -1).permute(1, 2, 0, 3) for z in (q, k, v))  # (b, nh, s, d)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.permute(2, 0, 1, 3).reshape(s, b, -1)  # (s, b, nh·d)


def tp_forward(m, x, *, heads, qkv_split, split_output=None):
    """The same maths for the full and the sharded layer (sharded: local heads, shards)."""
    a = m.qkv(m.ln1(x))
    q, k, v = split_output(a) if split_output else a.split(qkv_split, dim=-1)
    x = x + m.proj(attention(q, k, v, heads))
    return x + m.fc2(F.gelu(m.fc1(m.ln2(x))))


def shard_layer(full, sp, overlap, hooks):
    t = dist.get_world_size()
    h = full.qkv.in_features
    kw = dict(sequence_parallel=sp, overlap_sp_comm=overlap, sp_chunks=2)
    m = nn.Module()
    m.ln1, m.ln2 = nn.LayerNorm(h, dtype=torch.float64), nn.LayerNorm(h, dtype=torch.float64)
    m.ln1.load_state_dict(full.ln1.state_dict())
    m.ln2.load_state_dict(full.ln2.state_dict())
    m.qkv = ColumnParallelLinear.from_full(full.qkv, partition_sizes=[h, h, h],
                                           overlap_grad_comm=overlap, **kw)
    m.proj = RowParallelLinear.from_full(full.proj, **kw)
    m.fc1 = ColumnParallelLinear.from_full(full.fc1, overlap_grad_comm=overlap, **kw)
    m.fc2 = RowParallelLinear.from_full(full.fc2, **kw)
    if sp:
        mark_sequence_parallel(*m.ln1.parameters(), *m.ln2.parameters())
        if hooks:
            register_sequence_parallel_grad_hooks(m)
    assert full.heads % t == 0
    return m


def _layer_cases(cases):
    t, r = dist.get_world_size(), dist.get_rank()
    for c in cases:
        torch.manual_seed(c["seed"])
        h = c["heads"] * c["head_dim"]
        full = Layer(h, c["heads"], c["ffn"] * t)
        x = torch.randn(c["seq"], c["batch"], h, dtype=torch.float64)
        gy = torch.randn_like(x)
        xr = x.clone().requires_grad_(True)
        y_ref = full(xr)
        (y_ref * gy).sum().backward()
        ref = {n: p.grad for n, p in full.named_parameters()}
        for sp, overlap, hooks in [(False, False, False), (True, False, False), (True, True, True)]:
            m = shard_layer(full, sp, overlap, hooks)
            xin = (x.chunk(t, dim=0)[r] if sp else x).clone().requires_grad_(True)
            y = tp_forward(m, xin, heads=c["heads"] // t, qkv_split=None,
                           split_output=m.qkv.split_output)
            msg = f"layer case={c} sp={sp} overlap={overlap} hooks={hooks}"
            assert_close(y, y_ref.chunk(t, dim=0)[r] if sp else y_ref, msg=msg)
            (y * (gy.chunk(t, dim=0)[r] if sp else gy)).sum().backward()
            if sp and not hooks:
                assert allreduce_sequence_parallel_grads(m) == 4
            assert_close(xin.grad, xr.grad.chunk(t, dim=0)[r] if sp else xr.grad, msg=msg)
            for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
                         "proj.bias", "fc2.bias"):
                assert_close(m.get_parameter(name).grad, ref[name], msg=f"{msg} {name}")
            qkv_w = torch.cat([p.chunk(t, dim=0)[r] for p in ref["qkv.weight"].chunk(3)])
            qkv_b = torch.cat([p.chunk(t, dim=0)[r] for p in ref["qkv.bias"].chunk(3)])
            assert_close(m.qkv.weight.grad, qkv_w, msg=f"{msg} qkv.weight")
            assert_close(m.qkv.bias.grad, qkv_b, msg=f"{msg} qkv.bias")
            assert_close(m.fc1.weight.grad, ref["fc1.weight"].chunk(t, 0)[r], msg=f"{msg} fc1")
            assert_close(m.fc1.bias.grad, ref["fc1.bias"].chunk(t, 0)[r], msg=f"{msg} fc1.b")
            assert_close(m.proj.weight.grad, ref["proj.weight"].chunk(t, 1)[r], msg=f"{msg} proj")
            assert_close(m.fc2.weight.grad, ref["fc2.weight"].chunk(t, 1)[r], msg=f"{msg} fc2")
    return True


@st.composite
def layer_case(draw, world_size):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        heads=world_size * draw(st.integers(1, 2)),
        head_dim=draw(st.integers(1, 4)),
        ffn=draw(st.integers(1, 5)),
        seq=world_size * draw(st.integers(1, 4)),
        batch=draw(st.integers(1, 2)),
    )


@pytest.mark.parametrize("world_size", [1, 2, 4])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_transformer_layer_tp_sp_equals_single_device(world_size, data):
    cases = data.draw(st.lists(layer_case(world_size), min_size=2, max_size=2))
    assert all(run(_layer_cases, world_size, cases))


# ------------------------------------------------------------------ MLP with explicit regions
def _mlp_with_regions(seed):
    """column → GeLU → row, entering/leaving SP through the public region functions."""
    t, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(5, 4 * t, dtype=torch.float64), nn.Linear(4 * t, 5, dtype=torch.float64)
    x = torch.randn(2 * t, 3, 5, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    y_ref = fc2(F.gelu(fc1(xr)))
    y_ref.square().sum().backward()
    c1 = ColumnParallelLinear.from_full(fc1, sequence_parallel=True)
    r2 = RowParallelLinear.from_full(fc2, sequence_parallel=True)
    xin = x.clone().requires_grad_(True)
    shard = scatter_to_sequence_parallel_region(xin)  # (s/t, b, h)
    y = gather_from_sequence_parallel_region(r2(F.gelu(c1(shard))), grad_is_partial=False)
    assert_close(y, y_ref)
    y.square().sum().backward()
    # the input was replicated: every rank now holds the full gradient
    assert_close(xin.grad, xr.grad)
    assert_close(c1.weight.grad, fc1.weight.grad.chunk(t, 0)[r])
    assert_close(r2.weight.grad, fc2.weight.grad.chunk(t, 1)[r])
    assert_close(r2.bias.grad, fc2.bias.grad)
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_mlp_block_through_region_functions(world_size):
    assert all(run(_mlp_with_regions, world_size, 7))
