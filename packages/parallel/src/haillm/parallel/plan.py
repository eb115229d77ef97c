"""A declarative shard plan: parameter name → how it is split over the TP group.

Megatron writes the sharding rule of every weight into the constructor of its layer; a
checkpoint converter, an exporter and a resharder then each re-derive it. Here the rule is
data: one `Shard` per parameter-name pattern, and the *same* object answers every question
asked of it:

* `parallelize_module(model, plan, group=...)` swaps each planned `nn.Linear` / `nn.Embedding`
  for the matching `haillm.parallel` layer (column → `ColumnParallelLinear`, row →
  `RowParallelLinear`, vocab → `VocabParallelEmbedding`, or a column-parallel LM head);
* `Shard.local(full, rank, tp)`: this rank's slice of a full tensor (initialisation, loading
  a checkpoint or a Hugging Face file into any layout);
* `Shard.slices(shape, rank, tp)`: the index ranges of that slice, so a loader can read just
  those bytes from a memory-mapped file;
* `Shard.full(shards)` / `Shard.gather(local, group)`: the inverse (saving, exporting).

Merged projections are one parameter with several *parts* (Q, K, V of unequal widths under
GQA; gate and up): a column rule cuts every part separately, so rank r holds
``[Q_r, K_r, V_r]`` and splits its own GEMM output locally (not a contiguous 1/t of the
concatenation, which would give rank 0 all of Q).

    plan = {"layers.*.attn.wqkv.weight": Shard("column", parts=(q, kv, kv)),
            "layers.*.attn.wo.weight": Shard("row"), "embed.weight": Shard("vocab"),
            "layers.*.attn_norm.weight": Shard("replicated")}

Patterns are `fnmatch` patterns over the full parameter name (``*`` matches any text).
What the real one adds (torch's DTensor `parallelize_module` with `ColwiseParallel` /
`RowwiseParallel`): a tensor type that carries its placement, so every op knows the layout.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .comm import group_rank, group_size
from .embedding import VocabParallelEmbedding
from .grads import mark_sequence_parallel
from .linear import ColumnParallelLinear, RowParallelLinear
from .shard import Shard

__all__ = ["Shard", "find_rule", "parallelize_module"]


def find_rule(plan: Mapping[str, Shard], name: str) -> Shard | None:
    """The `Shard` of parameter `name` (the first matching pattern), or None."""
    for pattern, rule in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return rule
    return None


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    path, _, attr = name.rpartition(".")
    setattr(root.get_submodule(path) if path else root, attr, new)


def parallelize_module(model: nn.Module, plan: Mapping[str, Shard], *, group: Any = None,
                       sequence_parallel: bool = False, seq_dim: int = 0,
                       overlap: bool = True, strict: bool = True) -> nn.Module:
    """Apply tensor parallelism to `model` in place, as `plan` says; returns `model`.

    Each module owning a planned ``weight`` is replaced: `nn.Linear` + column (or vocab: an
    LM head) → `ColumnParallelLinear` (with the rule's parts), `nn.Linear` + row →
    `RowParallelLinear`, `nn.Embedding` + vocab → `VocabParallelEmbedding`. A replicated
    parameter stays; under sequence parallelism it is marked (`mark_sequence_parallel`): it
    sees a sequence shard, its gradient is a partial sum over TP. Works on the meta device
    (structure only: shards are materialised later with `Shard.local`); real weights are
    sliced with the same rule.

    Args:
        model: any module; names are matched as in ``model.named_parameters()``.
        plan: ``{pattern: Shard}``.
        group: the TP group; size 1 leaves the model as it is (degree 1 is a no-op).
        sequence_parallel: column layers all-gather a sequence-sharded input along
            `seq_dim`, row layers (and the embedding) reduce-scatter their output along it.
        seq_dim: the sequence dimension of the activations (1 for (B, S, d)).
        overlap: overlap the collectives with the GEMMs (the layers' ``overlap_*`` flags).
        strict: every parameter of `model` must match a rule (a forgotten weight would
            silently stay whole on every rank).

    Raises:
        ValueError: a parameter without a rule (strict), or a rule that does not fit its
            module (a row rule on an embedding).
    """
    t, r = group_size(group), group_rank(group)
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if find_rule(plan, n) is None]
    if strict and missing:
        raise ValueError(f"the shard plan has no rule for parameters {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    if t == 1:
        return model
    sp = bool(sequence_parallel)
    for mod_name, mod in list(model.named_modules()):
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        pname = f"{mod_name}.weight" if mod_name else "weight"
        rule = find_rule(plan, pname)
        if rule is None:
            continue
        if rule.kind == "replicated":
            if sp:
                mark_sequence_parallel(*mod.parameters(recurse=False))
            continue
        kw: dict[str, Any] = dict(group=group, sequence_parallel=sp, seq_dim=seq_dim,
                                  device=w.device, dtype=w.dtype)
        if isinstance(mod, nn.Embedding) and rule.kind == "vocab":
            new = VocabParallelEmbedding(mod.num_embeddings, mod.embedding_dim,
                                         padding_idx=mod.padding_idx, **kw)
        elif isinstance(mod, nn.Linear) and rule.kind in ("column", "vocab"):
            new = ColumnParallelLinear(mod.in_features, mod.out_features,
                                       bias=mod.bias is not None, overlap_grad_comm=overlap,
                                       overlap_sp_comm=overlap and sp,
                                       partition_sizes=list(rule.parts) or None, **kw)
        elif isinstance(mod, nn.Linear) and rule.kind == "row":
            new = RowParallelLinear(mod.in_features, mod.out_features,
                                    bias=mod.bias is not None, overlap_sp_comm=overlap and sp,
                                    **kw)
        else:
            raise ValueError(f"{pname}: a {rule.kind} rule does not fit a "
                             f"{type(mod).__name__}")
        if not w.is_meta:  # real weights: this rank's slice, by the same rule
            with torch.no_grad():
                new.weight.copy_(rule.local(w, r, t))
                if getattr(mod, "bias", None) is not None:
                    b_rule = Shard("column", rule.parts) if rule.dim == 0 else Shard("replicated")
                    new.bias.copy_(b_rule.local(mod.bias, r, t) if rule.dim == 0 else mod.bias)
        _swap(model, mod_name, new)
    return model
