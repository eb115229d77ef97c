"""The shard plan of `DeepSeekLM`: every parameter, its shape, its TP rule, its parts, its HF name.

One table, and everything that must know how a weight is laid out reads it:

* `parallelize` applies tensor parallelism with it (`haillm.parallel.parallelize_module`);
* the initialisation draws merged weights part by part (`parts`), so a parameter's values do
  not depend on whether Q, K and V are one GEMM or three;
* checkpoints store every parameter under its name with its *full* shape and reshard on load
  by slicing (`Shard.local`, `Shard.gather`), so any layout resumes any other;
* the end-of-run export gathers with it, and the Hugging Face conversion maps every part to
  its `LlamaForCausalLM` name (`hf`).

Megatron's rules (Shoeybi et al. 2019): the projections that *read* the residual stream
(Q|K|V, gate|up) are column-parallel, those that *write* it (O, down) row-parallel, so a block
needs one collective per sub-layer; the embedding table and the LM head are split over the
vocabulary; the norm weights are replicated (under sequence parallelism their gradients are
partial sums over TP). Parameter names never depend on the layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from haillm.parallel import Shard
from haillm.trainer.config import ModelConfig

__all__ = ["ParamSpec", "param_specs", "tp_plan"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of `DeepSeekLM`.

    Attributes:
        name: the parameter name (``layers.3.attn.wqkv.weight``), on every layout.
        shape: the full (unsharded) shape.
        shard: the TP rule.
        parts: ``((part name, rows), ...)`` of a merged weight, in order (Q, K, V; gate, up);
            empty when the weight is one part.
        hf: the Hugging Face Llama name of each part (or of the whole weight).
    """

    name: str
    shape: tuple[int, ...]
    shard: Shard
    parts: tuple[tuple[str, int], ...] = ()
    hf: tuple[str, ...] = ()


def _block(cfg: ModelConfig, i: int) -> list[ParamSpec]:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    p, h = f"layers.{i}.", f"model.layers.{i}."
    return [
        ParamSpec(p + "attn_norm.weight", (d,), Shard("replicated"), (),
                  (h + "input_layernorm.weight",)),
        ParamSpec(p + "attn.wqkv.weight", (q + 2 * kv, d), Shard("column", (q, kv, kv)),
                  ((p + "attn.wq.weight", q), (p + "attn.wk.weight", kv),
                   (p + "attn.wv.weight", kv)),
                  tuple(h + f"self_attn.{n}_proj.weight" for n in "qkv")),
        ParamSpec(p + "attn.wo.weight", (d, q), Shard("row"), (), (h + "self_attn.o_proj.weight",)),
        ParamSpec(p + "mlp_norm.weight", (d,), Shard("replicated"), (),
                  (h + "post_attention_layernorm.weight",)),
        ParamSpec(p + "mlp.w_gate_up.weight", (2 * f, d), Shard("column", (f, f)),
                  ((p + "mlp.w_gate.weight", f), (p + "mlp.w_up.weight", f)),
                  (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")),
        ParamSpec(p + "mlp.w_down.weight", (d, f), Shard("row"), (), (h + "mlp.down_proj.weight",)),
    ]


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """`{name: ParamSpec}` of every parameter of the whole model, in module order."""
    d, v = cfg.hidden_size, cfg.vocab_size
    specs = [ParamSpec("embed.weight", (v, d), Shard("vocab"), (), ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layers):
        specs += _block(cfg, i)
    specs += [ParamSpec("norm.weight", (d,), Shard("replicated"), (), ("model.norm.weight",)),
              ParamSpec("head.weight", (v, d), Shard("vocab"), (), ("lm_head.weight",))]
    return {s.name: s for s in specs}


def tp_plan(cfg: ModelConfig) -> dict[str, Shard]:
    """`{fnmatch pattern: Shard}` for `haillm.parallel.parallelize_module` (layers as ``*``)."""
    one_layer = dataclasses.replace(cfg, n_layers=1)
    return {s.name.replace("layers.0.", "layers.*."): s.shard
            for s in param_specs(one_layer).values()}
