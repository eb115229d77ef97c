"""haillm.parallel: tensor and sequence parallelism (Megatron-LM), communication overlapped.

* `ParallelDims`: the dp × cp × tp × pp rank grid (Megatron order, TP fastest) and its groups.
* Collectives (`all_gather_into_tensor`, `reduce_scatter_tensor`, `all_reduce`): one
  compatibility helper over torch's names (torch 2.5 → newest), with gloo fallbacks.
* Communication regions (Megatron's f and g, the sequence-parallel pair): autograd Functions.
* Shard plans: `Shard` (a sharding rule as data: slice, gather, merged parts) and
  `parallelize_module(model, {pattern: Shard}, group=...)` (swap in the TP layers).
* Layers: `ColumnParallelLinear`, `RowParallelLinear`, `VocabParallelEmbedding`,
  `vocab_parallel_cross_entropy`; each layer has `.from_full(module, group=...)`.
* Overlap: async input-gradient reduction behind the weight-gradient GEMM; chunked, pipelined
  all-gather/reduce-scatter around the GEMMs under sequence parallelism.
* Context parallelism: `context_parallel_attention` (ring attention, zigzag load balance),
  `split_sequence`, `gather_sequence`.
* `run_distributed` (in `haillm.parallel.testing`): N gloo ranks for tests and tutorials.
"""

from .comm import (
    CompletedWork,
    all_gather_into_tensor,
    all_gather_single,
    all_reduce,
    group_rank,
    group_size,
    reduce_scatter_single,
    reduce_scatter_tensor,
)
from .context import context_parallel_attention, gather_sequence, split_sequence
from .cross_entropy import vocab_parallel_cross_entropy
from .dims import Coords, ParallelDims
from .embedding import VocabParallelEmbedding
from .grads import (
    allreduce_sequence_parallel_grads,
    is_sequence_parallel,
    mark_sequence_parallel,
    register_sequence_parallel_grad_hooks,
)
from .linear import ColumnParallelLinear, RowParallelLinear
from .mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .overlap import gather_matmul, matmul_reduce_scatter
from .plan import find_rule, parallelize_module
from .shard import Shard
from .trace import Event, Tracer

__all__ = [
    "ColumnParallelLinear",
    "CompletedWork",
    "Coords",
    "Event",
    "ParallelDims",
    "RowParallelLinear",
    "Shard",
    "Tracer",
    "VocabParallelEmbedding",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_reduce",
    "allreduce_sequence_parallel_grads",
    "context_parallel_attention",
    "find_rule",
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "gather_matmul",
    "gather_sequence",
    "group_rank",
    "group_size",
    "is_sequence_parallel",
    "mark_sequence_parallel",
    "matmul_reduce_scatter",
    "parallelize_module",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter_to_sequence_parallel_region",
    "register_sequence_parallel_grad_hooks",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "split_sequence",
    "vocab_parallel_cross_entropy",
]
