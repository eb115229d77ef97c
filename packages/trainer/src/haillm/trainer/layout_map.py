"""The layout-independent form of a pipeline stage's tensors: full logical names and shapes.

A rank's `StageModel` holds TP *shards* of *merged* weights (`wqkv` = this rank's rows of
Wq, Wk and Wv; `w_gate_up` = its rows of W_gate and W_up) of some layers only. A checkpoint
that must load into another (dp, tp, pp) layout stores, instead, every tensor under its name
in `reference.DeepSeekLM` (`layers.7.attn.wk.weight`) with its global shape. This module maps
any per-parameter tensors (the weights themselves, fp32 master weights, Adam moments) between
the two forms:

* `to_logical(stage, tensors)`: all-gather over TP and un-merge (collective over TP);
* `from_logical(stage, full)`: slice this rank's part and merge (local, no communication).

Sharding rules (Megatron): column-parallel weights (Wq/Wk/Wv, W_gate/W_up, the vocab-parallel
embedding and head) are cut along dim 0, row-parallel ones (Wo, W_down) along dim 1, norm
weights are replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["from_logical", "logical_shapes", "stage_rules", "to_logical"]


def stage_rules(stage) -> dict[str, tuple[str, list[str]]]:
    """`{stage param name: (kind, [logical names])}`; kind in rows/cols/qkv/gate_up/replicated.

    Parameters are found by identity (`block.wqkv` is a plain parameter, or the weight of
    `haillm.parallel`'s ColumnParallelLinear when installed), so the names follow the module.
    """
    name_of = {id(p): n for n, p in stage.named_parameters()}
    rules: dict[str, tuple[str, list[str]]] = {}
    if stage.first:
        rules[name_of[id(stage.embed)]] = ("rows", ["embed.weight"])
    for blk, i in zip(stage.layers, stage.layer_ids):
        q = f"layers.{i}."
        for p, kind, names in (
                (blk.attn_norm, "replicated", ["attn_norm.weight"]),
                (blk.wqkv, "qkv", [f"attn.{n}.weight" for n in ("wq", "wk", "wv")]),
                (blk.wo, "cols", ["attn.wo.weight"]),
                (blk.mlp_norm, "replicated", ["mlp_norm.weight"]),
                (blk.w_gate_up, "gate_up", ["mlp.w_gate.weight", "mlp.w_up.weight"]),
                (blk.w_down, "cols", ["mlp.w_down.weight"])):
            rules[name_of[id(p)]] = (kind, [q + n for n in names])
    if stage.last:
        rules[name_of[id(stage.norm)]] = ("replicated", ["norm.weight"])
        rules[name_of[id(stage.head)]] = ("rows", ["head.weight"])
    if len(rules) != len(name_of):
        missing = sorted(set(name_of.values()) - set(rules))
        raise RuntimeError(f"checkpoint layout map does not know parameters {missing}")
    return rules


def _qkv_split(stage) -> list[int]:
    """Rows of Wq, Wk, Wv inside one TP rank's merged `wqkv` (GQA: the kv widths differ)."""
    hd, tp = stage.cfg.head_dim, stage.grid.tp
    return [stage.cfg.n_heads // tp * hd, stage.cfg.n_kv_heads // tp * hd,
            stage.cfg.n_kv_heads // tp * hd]


def logical_shapes(stage) -> dict[str, tuple[int, ...]]:
    """Global shape of every logical tensor this stage holds a part of."""
    c = stage.cfg
    d, f, v, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    shapes = {"embed.weight": (v, d), "head.weight": (v, d), "norm.weight": (d,)}
    per = {"attn_norm.weight": (d,), "mlp_norm.weight": (d,), "attn.wq.weight": (c.n_heads * hd, d),
           "attn.wk.weight": (c.n_kv_heads * hd, d), "attn.wv.weight": (c.n_kv_heads * hd, d),
           "attn.wo.weight": (d, c.n_heads * hd), "mlp.w_gate.weight": (f, d),
           "mlp.w_up.weight": (f, d), "mlp.w_down.weight": (d, f)}
    out = {}
    for _kind, names in stage_rules(stage).values():
        for n in names:
            out[n] = shapes.get(n) or per[n.split(".", 2)[2]]
    return out


@torch.no_grad()
def to_logical(stage, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage-local tensors (named and shaped like `stage.named_parameters()`) -> full logical.

    Collective over the TP group: every TP rank of the stage must call it with the same keys.
    """
    g, tp = stage.grid.tp_group, stage.grid.tp
    out: dict[str, torch.Tensor] = {}
    for name, (kind, logical) in stage_rules(stage).items():
        t = tensors[name].detach().contiguous()
        if kind == "replicated":
            out[logical[0]] = t.clone()
            continue
        parts = [t]
        if tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t, group=g)
        if kind == "rows":
            out[logical[0]] = torch.cat(parts, 0)
        elif kind == "cols":
            out[logical[0]] = torch.cat(parts, 1)
        elif kind == "qkv":
            split = _qkv_split(stage)
            for k, n in enumerate(logical):
                out[n] = torch.cat([p.split(split)[k] for p in parts], 0)
        else:  # gate_up: each rank holds [its W_gate rows ; its W_up rows]
            for k, n in enumerate(logical):
                out[n] = torch.cat([p.chunk(2)[k] for p in parts], 0)
    return out


def from_logical(stage, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full logical tensors -> this rank's stage-local ones (the inverse of `to_logical`)."""
    tp, r = stage.grid.tp, stage.grid.tp_rank
    out: dict[str, torch.Tensor] = {}
    for name, (kind, logical) in stage_rules(stage).items():
        ts = [full[n] for n in logical]
        if kind == "replicated":
            out[name] = ts[0]
        elif kind == "cols":
            out[name] = ts[0].chunk(tp, dim=1)[r]
        else:  # rows, qkv, gate_up: this rank's rows of each, concatenated
            out[name] = torch.cat([t.chunk(tp, dim=0)[r] for t in ts], 0)
    return out
