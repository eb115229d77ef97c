"""VocabParallelEmbedding: the embedding table split by vocabulary rows over the TP group.

Rank r holds rows `[r·V/t, (r+1)·V/t)` of the (V, h) table. Each rank looks up the tokens that
fall in its range, writes zeros for the others, and the **g** all-reduce sums the t partial
results: exactly one rank contributed each token's row. Under sequence parallelism the sum is
a reduce-scatter along the sequence instead (Megatron-core's `reduce_scatter_embeddings`), so
the output is already the sequence shard the following SP region wants.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .comm import group_rank, group_size
from .mappings import (
    check_divisible,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from .shard import Shard

__all__ = ["VocabParallelEmbedding"]


class VocabParallelEmbedding(nn.Module):
    """An `nn.Embedding` whose rows (the vocabulary) are split over the TP group.

    Args:
        num_embeddings: vocabulary size V (full); divisible by t (pad the vocabulary, as
            Megatron's `--make-vocab-size-divisible-by` does).
        embedding_dim: hidden size h.
        group: TP process group.
        padding_idx: as in `nn.Embedding` (that row gets no gradient).
        sequence_parallel: reduce-scatter the output along `seq_dim` instead of all-reducing.
        seq_dim: sequence dimension of the ids (default 0; use 1 for (batch, seq) ids).
        device: of the table.
        dtype: of the table.

    Shapes:
        ids: (...) int64 in [0, V).
        returns: (..., h); under SP the `seq_dim` axis is s/t.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: Any = None,
                 padding_idx: int | None = None, sequence_parallel: bool = False,
                 seq_dim: int = 0, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        t, r = group_size(group), group_rank(group)
        n = check_divisible(num_embeddings, t, "num_embeddings")
        self.num_embeddings, self.embedding_dim, self.tp, self.group = (
            num_embeddings, embedding_dim, t, group)
        self.vocab_start, self.vocab_end = r * n, (r + 1) * n
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx ({padding_idx}) must be within num_embeddings ({num_embeddings})")
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.weight = nn.Parameter(torch.empty(n, embedding_dim, device=device, dtype=dtype))
        if self.weight.is_meta:  # structure only (values come later): no init to run
            return
        with torch.no_grad():
            nn.init.normal_(self.weight)  # nn.Embedding's default init
            if self._local_padding_idx() is not None:
                self.weight[self._local_padding_idx()].zero_()

    def _local_padding_idx(self) -> int | None:
        p = self.padding_idx
        if p is None or not self.vocab_start <= p < self.vocab_end:
            return None
        return p - self.vocab_start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            out = F.embedding(ids, self.weight, self._local_padding_idx())
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight, self._local_padding_idx())
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # (..., h): zero where not ours
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group,
                                                              seq_dim=self.seq_dim % ids.dim())
        return reduce_from_tensor_parallel_region(out, self.group)

    @classmethod
    def from_full(cls, module: nn.Embedding, *, group: Any = None, **kw: Any) -> VocabParallelEmbedding:
        """Shard an `nn.Embedding` every rank holds identically: keep rows `.chunk(t)[r]`."""
        kw.setdefault("padding_idx", module.padding_idx)
        layer = cls(module.num_embeddings, module.embedding_dim, group=group,
                    device=module.weight.device, dtype=module.weight.dtype, **kw)
        with torch.no_grad():
            layer.weight.copy_(Shard("vocab").local(module.weight, group_rank(group), layer.tp))
        return layer

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp}, rows "
                f"[{self.vocab_start}, {self.vocab_end}), sequence_parallel={self.sequence_parallel}")
