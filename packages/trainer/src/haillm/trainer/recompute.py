"""Activation recomputation: step 4 of `parallelize` (`parallel.recompute`).

Backward needs the tensors that forward saved; for a decoder block those are ~20-40 copies
of the (B, S, d) stream (`haillm.trainer.plan` counts them). Recomputation trades FLOPs for
that memory (Chen et al. 2016, "Training deep nets with sublinear memory cost"; Korthikanti
et al. 2022, "Reducing activation recomputation in large transformer models"):

* ``full``: every decoder block keeps only its inputs, the stream h and the residual
  (B, S_local, d) each, and re-runs its forward at the start of its own backward (Megatron's
  ``--recompute-granularity full``). Memory per block drops to 2 s b h p / n; the price is
  one more forward of the blocks (8N instead of 6N FLOPs per token) and, under sequence
  parallelism, the forward's collectives once more: the recomputed `wqkv` and `w_gate_up`
  re-gather the sequence (2 all-gathers) and `wo`, `w_down` reduce-scatter again (2
  reduce-scatters) per block and micro-batch, because only the sequence shard was kept. No
  other collective is repeated (the backward's own are unchanged).
* ``selective``: keep every GEMM input, recompute only the cheap, memory-heavy element-wise
  parts: the PyTorch RMSNorms (their fp32 input and normalised copies, 8 s b h bytes, become
  the input h alone) and the SwiGLU activation silu(gate) * up (the silu output is not
  kept). Korthikanti's "selective" recomputes the attention core (softmax, dropout, the
  s^2 scores); FlashAttention (`flash_attention`, `impl` tiled or triton) already does that
  in its backward from O and the logsumexp, so with flash attention that part is done; with
  `attention = reference` the probabilities stay saved. The fused kernels keep nothing
  to drop: the Triton RMSNorm saves h and two fp32 row statistics (it is left as it is) and
  `linear_swiglu`'s kernel saves only its input x and recomputes both GEMMs in backward.
  The recomputed regions contain no collective: selective costs no communication.
* ``parallel.recompute_layers = N``: only the first N blocks of each model chunk (virtual
  pipeline stage) recompute (Megatron's ``--recompute-method block``): the memory of the
  other blocks buys back their FLOPs.

Why `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` and not our own
`autograd.Function` or the reentrant variant: the non-reentrant implementation works through
saved-tensor hooks, so (1) the pipeline executor may start the backward through the autograd
engine directly (`run_backward` with released output storage) and any outer hooks still see
the checkpoint's inputs; (2) a region whose inputs do not require grad (a first block reading
the embedding of a frozen table, `cos`/`sin`) still gives its parameters their gradients,
which the reentrant one silently drops; (3) it accepts keyword and non-tensor arguments
(`residual=None`, `cache`) and returns a tuple of two tensors as `Block.forward` does; (4)
``preserve_rng_state=True`` restores the CPU and CUDA RNG state before the recompute, so a
random op (dropout, which this model does not have, or a stochastic kernel) sees the same
numbers twice. The recomputed forward reads the same parameters (the bf16 weights of a bf16
run, or the fp32 ones: whatever the module holds), and under autocast checkpoint re-enters
the same autocast state, so the recomputed tensors equal the saved ones bit for bit. The
in-place cross-entropy is never recomputed: it runs after the last block, outside every
checkpointed region (it overwrites the logits with their gradient; recomputing it would read
a destroyed tensor). Pipeline stage inputs are plain leaves outside the blocks (kept by the
executor until the micro-batch's backward), and a chunk's output is the sum h + residual
computed after its last block: the executor may release it after sending, as before.

Recomputation never renames a parameter: it replaces the `forward` of the chosen module
*instances* (a `Block`, an `RMSNorm`, the MLP's `activation`) by a checkpointed one, so
checkpoints and the shard plan are unaffected. Under `torch.no_grad()` (evaluation,
generation) and with a KV cache the original forward runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from haillm.fusedops import RMSNorm
from haillm.trainer.config import ParallelConfig
from haillm.trainer.model import MLP, Block, DeepSeekLM, swiglu

__all__ = ["MODES", "apply_recompute", "checkpointed", "recomputed_layers"]

MODES = ("none", "selective", "full")


def checkpointed(fn: Callable) -> Callable:
    """`fn` recomputed in backward: ``checkpoint(fn, *args, use_reentrant=False,
    preserve_rng_state=True)`` while autograd records, `fn` itself otherwise."""

    @functools.wraps(fn)
    def run(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)

    run.recomputed = True  # type: ignore[attr-defined]
    return run


def _full(block: Block) -> None:
    """Checkpoint the whole block: (h, residual, cos, sin) are all it keeps."""
    forward = block.forward  # the bound Block.forward

    def recomputed_forward(h, residual, cos, sin, cache=None):
        """h, residual (B, S_local, d) (residual None on a chunk's first block), cos, sin
        (S, head_dim) -> (h', residual'), recomputed in backward from these inputs."""
        if cache is not None or not torch.is_grad_enabled():  # generation / evaluation
            return forward(h, residual, cos, sin, cache)
        return checkpoint(forward, h, residual, cos, sin, use_reentrant=False,
                          preserve_rng_state=True)

    block.forward = recomputed_forward
    block.recompute = "full"


def _selective_norm(norm: RMSNorm) -> None:
    """Checkpoint a PyTorch RMSNorm: it keeps its input h = x + residual only (the add runs
    outside the region, exactly as `rms_norm`'s reference forms it, so the sum is the one the
    next block reads and is not stored twice). The Triton kernel (CUDA) is left alone."""
    forward = norm.forward

    def recomputed_forward(x, residual=None):
        """x, residual (..., d) -> y, or (y, h = x + residual)."""
        if not torch.is_grad_enabled() or (x.is_cuda and norm.impl != "reference"):
            return forward(x, residual)
        if residual is None:
            return checkpoint(forward, x, use_reentrant=False, preserve_rng_state=True)
        h = x + residual  # rms_norm_reference's residual_add: the same op, the same bits
        return checkpoint(forward, h, use_reentrant=False, preserve_rng_state=True), h

    norm.forward = recomputed_forward


def _selective(block: Block) -> None:
    """Checkpoint the two norms and the SwiGLU activation of `block` (GEMM inputs kept)."""
    _selective_norm(block.attn_norm)
    _selective_norm(block.mlp_norm)
    mlp: MLP = block.mlp
    mlp.activation = checkpointed(swiglu)  # gate, up (the GEMM output) kept; silu recomputed
    block.recompute = "selective"


def recomputed_layers(n_layers: int, n_stages: int, p: ParallelConfig) -> list[int]:
    """Layer ids that recompute: with `recompute_layers = N`, the first N of each of the
    `n_stages` virtual pipeline stages (split as `split_layers` does); else all of them."""
    from haillm.trainer.parallelize import split_layers

    if p.recompute == "none":
        return []
    n = p.recompute_layers
    return [i for r in split_layers(n_layers, n_stages) for i in (r[:n] if n else r)]


def apply_recompute(model: DeepSeekLM, n_stages: int, p: ParallelConfig) -> dict[str, str]:
    """Step 4 of `parallelize`: make the chosen blocks of `model` recompute in backward
    (`p.recompute`: none, selective or full; `p.recompute_layers`). `n_stages`: virtual
    pipeline stages (pp x chunks) the model will be split into, for `recompute_layers`.
    In place; returns what it did (for the start-up wiring lines)."""
    if p.recompute not in MODES:
        raise ValueError(f"parallel.recompute must be one of {', '.join(MODES)}, "
                         f"got {p.recompute!r}")
    if p.recompute == "none":
        return {}
    ids = recomputed_layers(model.cfg.n_layers, n_stages, p)
    for i in ids:
        block = model.layers[str(i)]
        (_full if p.recompute == "full" else _selective)(block)
    what = ("each block from its inputs (torch.utils.checkpoint, non-reentrant)"
            if p.recompute == "full" else
            "the norms and silu(gate) * up (torch.utils.checkpoint, non-reentrant)")
    which = (f"first {p.recompute_layers} blocks of each chunk" if p.recompute_layers
             else "every block")
    return {"recompute": f"{p.recompute}: {what}; {which} ({len(ids)} here)"}
