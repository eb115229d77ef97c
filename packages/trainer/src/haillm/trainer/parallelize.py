"""`parallelize`: one rank's share of `DeepSeekLM`, made by transforms in one documented order.

    DeepSeekLM (meta: structure, no memory)
      1. fused ops     norms, SwiGLU, attention impl, cross-entropy: the packages' kernels
      2. TP / SP       haillm.parallel layers per the shard plan (column / row / vocab)
      3. CP            ring attention over the cp group; RoPE at the zigzag positions
      4. recompute     activation recomputation: full blocks or the norms + SwiGLU (recompute.py)
      5. pipeline      split into chunks (virtual stage c*pp + s is chunk c of stage s)
      6. values        this rank's slices only, one parameter at a time (seed, checkpoint, HF)
      7. ZeRO-1 / DDP  haillm.zero: fp32 main grads, sharded (or replicated) optimizer state

At degree 1 every transform is the identity, and no transform renames a parameter: the names
are those of `shard_plan` on every layout, which is what lets a checkpoint of one layout load
into another. The order matters where transforms meet: TP swaps modules before the pipeline
split keeps some of them; values are drawn after the split and the swap, so a rank never
allocates what it does not own (the 67B stage build); ZeRO comes last because it turns the
final parameters into views of its flat buffers; under CP it reduces over dp x cp (every
CP rank holds the same parameters and saw other tokens). torchtitan's `parallelize_llama` is the
model (its order: TP, activation checkpointing, compile, FSDP; pipeline splitting first).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from haillm.fusedops import RMSNorm, cross_entropy_reference, inplace_cross_entropy
from haillm.parallel import (
    ParallelDims,
    parallelize_module,
    register_sequence_parallel_grad_hooks,
    vocab_parallel_cross_entropy,
)
from haillm.trainer.config import Config, ParallelConfig
from haillm.trainer.model import MLP, Attention, DeepSeekLM, init_value
from haillm.trainer.recompute import apply_recompute
from haillm.trainer.shard_plan import param_specs, tp_plan
from haillm.zero import ZeroDataParallel

__all__ = ["DTYPES", "ModelChunks", "apply_context_parallel", "apply_data_parallel",
           "apply_fused_ops", "apply_tensor_parallel", "materialize", "parallelize", "split_layers",
           "split_pipeline"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION_IMPLS = {"auto": "auto", "torch": "tiled", "tiled": "tiled", "triton": "triton",
                   "reference": "reference", "flash": "auto"}


class ModelChunks(list):
    """This rank's model chunks (a list of `DeepSeekLM`; one unless interleaved), plus:

    Attributes:
        local: the `DeepSeekLM` holding all of this rank's modules (the chunks' union; its
            parameter names are the shard plan's); what the optimizer and checkpoints see.
        data_parallel: the `haillm.zero.ZeroDataParallel` around `local` (None before step 7).
        dims: the `ParallelDims`.
        wiring: ``{what: which package function runs it}``, printed at start-up.
    """

    local: DeepSeekLM
    data_parallel: ZeroDataParallel | None = None
    dims: ParallelDims
    wiring: dict[str, str]


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Layers per (virtual) stage, as even as possible (the first stages take the remainder)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


# ------------------------------------------------------------------------------ 1. fused ops
def apply_fused_ops(model: DeepSeekLM, p: ParallelConfig) -> dict[str, str]:
    """Choose each operation's implementation (in place). Off selects the *same package's*
    reference path, never a trainer copy. Returns what runs."""
    attn = ATTENTION_IMPLS.get(p.attention, p.attention)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.impl = "auto" if p.fused_norm else "reference"
        elif isinstance(m, Attention):
            m.impl = attn
        elif isinstance(m, MLP):
            m.impl = "auto" if p.fused_swiglu else "reference"
    model.cross_entropy = inplace_cross_entropy if p.fused_cross_entropy else \
        cross_entropy_reference
    return {
        "attention": f"haillm.flashattn.flash_attention (impl={attn})",
        "rms_norm": "haillm.fusedops.rms_norm (fused residual add)" if p.fused_norm
        else "haillm.fusedops.rms_norm (impl=reference, unfused)",
        "swiglu": "haillm.fusedops.linear_swiglu" if p.fused_swiglu
        else "plain GEMM then silu * up (linear_swiglu's reference)",
        "cross_entropy": "haillm.fusedops.inplace_cross_entropy" if p.fused_cross_entropy
        else "haillm.fusedops.cross_entropy_reference",
    }


# ------------------------------------------------------------------------------ 2. TP / SP
def apply_tensor_parallel(model: DeepSeekLM, dims: ParallelDims, p: ParallelConfig
                          ) -> dict[str, str]:
    """Megatron TP (+ SP) per the shard plan, in place; tp = 1: nothing changes."""
    if dims.tp == 1:
        return {}
    sp, g = p.sequence_parallel, dims.tp_group
    parallelize_module(model, tp_plan(model.cfg), group=g, sequence_parallel=sp, seq_dim=1,
                       overlap=p.tp_comm_overlap)
    for m in model.modules():
        if isinstance(m, Attention):  # this rank's heads (the plan cut q, k and v by heads)
            m.n_heads //= dims.tp
            m.n_kv_heads //= dims.tp
    # the head is column-parallel: each rank holds V/tp logits, the loss reduces over TP
    model.cross_entropy = functools.partial(vocab_parallel_cross_entropy, group=g)
    model.seq_shards = dims.tp if sp else 1
    return {"tp layers": "haillm.parallel.parallelize_module: Column/RowParallelLinear, "
                         "VocabParallelEmbedding, column-parallel head (comm overlap "
                         f"{'on' if p.tp_comm_overlap else 'off'})",
            "cross_entropy": "haillm.parallel.vocab_parallel_cross_entropy",
            "sequence parallel": "on" if sp else "off"}


# ------------------------------------------------------------------------------ 3. CP
def apply_context_parallel(model: DeepSeekLM, dims: ParallelDims, p: ParallelConfig
                           ) -> dict[str, str]:
    """Context parallelism (ring attention, Liu et al. 2023; Megatron-core's CP), in place;
    cp = 1: nothing changes.

    Every `Attention` calls `haillm.parallel.context_parallel_attention` over `dims.cp_group`
    (zigzag layout, `load_balance=True`; its block computations use the attention impl that
    step 1 chose), and the model computes RoPE at the positions of this rank's chunks
    (`DeepSeekLM.positions`). The caller feeds each CP rank `split_sequence` of the same
    sequences' tokens and targets: (B, S/cp), so the stream is (B, S/cp[/tp], d). Nothing
    else changes: the weights are replicated over CP (their gradients reduce over dp x cp in
    step 7), and the loss is the mean over the local tokens, which the dp x cp gradient
    average turns into the mean over the whole batch (every rank holds B*S/cp tokens).
    """
    if dims.cp == 1:
        return {}
    g = dims.cp_group
    impl = None
    for m in model.modules():
        if isinstance(m, Attention):
            m.cp_group, impl = g, m.impl
    model.cp_group, model.cp = g, dims.cp
    return {"context parallel": f"haillm.parallel.context_parallel_attention (ring over "
                                f"cp={dims.cp} ranks, zigzag layout; blocks: flash_attention "
                                f"impl={impl}); RoPE at the zigzag positions"}


# ------------------------------------------------------------------------------ 5. pipeline
def split_pipeline(model: DeepSeekLM, dims: ParallelDims, p: ParallelConfig
                   ) -> tuple[list[DeepSeekLM], DeepSeekLM]:
    """This rank's chunks (sharing the model's modules) and their union. pp = 1 with one
    chunk: the model itself."""
    v = p.chunks if p.pipeline_schedule == "interleaved" else 1
    if dims.pp * v == 1:
        return [model], model
    split = split_layers(model.cfg.n_layers, dims.pp * v)
    s = dims.pp_rank
    chunks = [model.stage(split[c * dims.pp + s], first=(c == 0 and s == 0),
                          last=(c == v - 1 and s == dims.pp - 1)) for c in range(v)]
    mine = [i for c in range(v) for i in split[c * dims.pp + s]]
    local = model.stage(mine, first=dims.is_first_stage, last=dims.is_last_stage)
    return chunks, local


# ------------------------------------------------------------------------------ 6. values
def materialize(local: DeepSeekLM, dims: ParallelDims, *, dtype=torch.float32, device="cpu",
                source: Callable[[str], torch.Tensor] | None = None) -> None:
    """Give this rank's parameters their values: for each parameter, the full tensor from
    `source(name)` (default: the seeded init) sliced by its shard-plan rule, cast to `dtype`
    on `device`; one parameter at a time, so the peak is one full tensor. Parameters that
    already hold values are only cast.

    A source with a ``local(name, spec, rank, tp)`` method (`haillm.trainer.hf.HFReader`)
    returns this rank's slice itself, of shape ``spec.shard.local_shape``: a memory-mapped
    reader then reads only the bytes this rank owns, never the full tensor."""
    specs = param_specs(local.cfg)
    source = source or (lambda name: init_value(local.cfg, local.seed, name, specs[name]))

    def value(name, _p):
        if hasattr(source, "local"):
            return source.local(name, specs[name], dims.tp_rank, dims.tp)
        return specs[name].shard.local(source(name), dims.tp_rank, dims.tp)

    local.materialize_(value, dtype=dtype, device=device)
    local.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------ 7. ZeRO / DDP
def apply_data_parallel(local: DeepSeekLM, dims: ParallelDims, p: ParallelConfig
                        ) -> tuple[ZeroDataParallel, dict[str, str]]:
    """Gradient synchronisation: the SP norm-weight gradients summed over TP (tensor hooks,
    before `.grad` accumulates), then `haillm.zero.ZeroDataParallel` (fp32 main grads,
    bucketed reduce-scatter, or all-reduce with ZeRO off, started from the last backward)
    over dp x cp: the CP ranks hold the same parameters like DP replicas (Megatron-core's
    data-parallel-with-CP group); `dims.dp_cp_group` is the dp group when cp = 1."""
    if dims.tp > 1 and p.sequence_parallel:
        local._sp_hooks = register_sequence_parallel_grad_hooks(local, dims.tp_group)
    zdp = ZeroDataParallel(local, dp_group=dims.dp_cp_group, bucket_mb=4.0,
                           overlap=p.overlap_grad_reduce, shard=p.zero)
    over = "DP x CP" if dims.cp > 1 else "DP"
    what = (f"haillm.zero.ZeroDataParallel (ZeRO-1 over {over}: fp32 main grads, bucketed "
            "reduce-scatter)" if p.zero else
            f"haillm.zero.ZeroDataParallel (shard=False: all-reduce over {over}, plain DP)")
    return zdp, {"data parallel": what}


def parallelize(model: DeepSeekLM, dims: ParallelDims, cfg: Config, *,
                source: Callable[[str], torch.Tensor] | None = None,
                data_parallel: bool = True) -> ModelChunks:
    """This rank's model chunks: `model` transformed in the order of the module docstring.

    Args:
        model: a `DeepSeekLM`, normally lazy (meta parameters); an eager one works too (its
            weights are sliced instead of drawn).
        dims: a built `ParallelDims` (dp, cp, tp, pp).
        cfg: the run's config (`parallel` switches, `train.precision`, `run.device`).
        source: ``source(name) -> full fp32 tensor``: where values come from (default the
            seeded init; a checkpoint or a Hugging Face folder reader).
        data_parallel: apply step 7 (ZeRO-1 / DDP); False for inference or tests.

    Returns:
        `ModelChunks`: with pp = 1 one chunk mapping (tokens, targets) to the mean loss
        (under CP: this rank's `split_sequence` shards (B, S/cp) of both, the local mean).
    """
    p = cfg.parallel
    wiring = apply_fused_ops(model, p)
    wiring.update(apply_tensor_parallel(model, dims, p))
    wiring.update(apply_context_parallel(model, dims, p))
    # 4: before the split, so that `recompute_layers` counts within each (virtual) stage
    wiring.update(apply_recompute(
        model, dims.pp * (p.chunks if p.pipeline_schedule == "interleaved" else 1), p))
    chunks, local = split_pipeline(model, dims, p)
    device = torch.device(cfg.run.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    materialize(local, dims, dtype=DTYPES[cfg.train.precision], device=device, source=source)
    out = ModelChunks(chunks)
    out.local, out.dims, out.wiring = local, dims, wiring
    if data_parallel:
        out.data_parallel, what = apply_data_parallel(local, dims, p)
        out.wiring.update(what)
    return out
