"""haillm.flashattn: tiled FlashAttention with recomputation (forward and backward), PyTorch and Triton.

* `attention_reference`: plain PyTorch, materialises the (seqlen_q x seqlen_k) scores.
* `flash_attention(impl="tiled")`: pure-PyTorch blockwise online softmax; saves only O and the
  logsumexp, backward recomputes the probabilities block by block (FlashAttention-2).
* `flash_attention(impl="triton")`: the same algorithm as Triton kernels (forward, dK/dV, dQ).
* `flash_attention(..., return_lse=True)` also returns the logsumexp, and
  `flash_attention_backward` runs the backward from a given (out, lse): the pieces ring
  attention (`haillm.parallel.context_parallel_attention`) merges.
* `flash_attention_varlen`: packed variable-length sequences through `cu_seqlens`.
"""

from .functional import flash_attention, flash_attention_backward, flash_attention_varlen
from .reference import attention_reference

__all__ = ["attention_reference", "flash_attention", "flash_attention_backward",
           "flash_attention_varlen"]
