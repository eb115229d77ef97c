"""The parallel DeepSeek LLM: one pipeline stage, its weights sharded over the TP group.

Built from a `reference.DeepSeekLM` that every rank constructs from the same seed: each rank
keeps only its slices, so the parallel model starts bit-identical to the reference. The
reference may be lazy (meta parameters): a stage then materialises one reference layer at a
time, slices it and frees it, so a rank never holds more than one full layer (plus the
embedding or head) on top of its own shards.

Per decoder block, under tensor parallelism (Megatron) with sequence parallelism (SP):

    x (B, S/tp, d) --fused rms_norm(+residual)--> gather_seq --> [Wq|Wk|Wv]_r  (merged QKV,
    column-parallel: this rank's heads) --> RoPE --> flash_attention (local heads, GQA)
    --> Wo_r (row-parallel) --> reduce-scatter along the sequence --> (B, S/tp, d)
    same for the MLP: gather_seq --> linear_swiglu([Wg|Wu]_r) --> Wdown_r --> reduce-scatter.

The projections are `haillm.parallel`'s Column/RowParallelLinear (which run the SP collectives
themselves, overlapped with the GEMMs); the regions around the fused SwiGLU GEMM, the
embedding and the head are `haillm.parallel`'s mappings. Without SP the gather/reduce-scatter
pair becomes Megatron's f/g (identity and all-reduce); at tp = 1 everything is the identity
and the weights are plain parameters.
The stage's first/last roles: the embedding (vocab-parallel) on the first stage, the final
norm, the head (vocab-parallel) and the loss on the last. Between stages only the residual
stream travels: (B, S/tp, d) under SP, (B, S, d) otherwise.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from haillm.parallel import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    mark_sequence_parallel,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from haillm.trainer.config import ModelConfig
from haillm.trainer.grid import Grid
from haillm.trainer.ops import Ops
from haillm.trainer.reference import DeepSeekLM, apply_rope, rope_cache

__all__ = ["ParallelBlock", "StageModel", "gather_full_state", "split_layers"]


# haillm.parallel's regions, with the trainer's (B, S, d) layout: the sequence is dim 1.
# Each is the identity at tp = 1.
def copy_to_tp(x, group):
    """Megatron f: identity forward, all-reduce backward."""
    return copy_to_tensor_parallel_region(x, group)


def reduce_from_tp(x, group):
    """Megatron g: all-reduce forward, identity backward."""
    return reduce_from_tensor_parallel_region(x, group)


def gather_seq(x, group):
    """SP: (B, S/tp, ...) -> (B, S, ...) all-gather; backward reduce-scatters."""
    return gather_from_sequence_parallel_region(x, group, seq_dim=1)


def scatter_seq_reduce(x, group):
    """SP: (B, S, ...) partial sums -> (B, S/tp, ...) reduced; backward all-gathers."""
    return reduce_scatter_to_sequence_parallel_region(x, group, seq_dim=1)


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Layers per stage, as even as possible (the first stages take the remainder)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


@contextmanager
def _materialized(ref: DeepSeekLM, prefix: str):
    """Inside: the reference's parameters under `prefix` hold values (a lazy reference is
    materialised for the block and freed after; an eager one is left as it is)."""
    names = ref.materialize_(prefix)
    try:
        yield
    finally:
        ref.release_(names)


def _rows(w: torch.Tensor, r: int, n: int) -> torch.Tensor:
    return w.chunk(n, dim=0)[r]


def _cols(w: torch.Tensor, r: int, n: int) -> torch.Tensor:
    return w.chunk(n, dim=1)[r]


def _param(t: torch.Tensor, dtype, device, *, replicated=False, sp=False) -> nn.Parameter:
    p = nn.Parameter(t.detach().to(device=device, dtype=dtype).contiguous().clone())
    p.tp_replicated = replicated  # norm weights: same on every TP rank, no weight decay
    if replicated and sp:
        # under SP each TP rank sees only its part of the sequence: the gradient is a partial
        # sum, all-reduced over TP by haillm.parallel's hooks (registered by the optimizer)
        mark_sequence_parallel(p)
    return p


class ParallelBlock(nn.Module):
    """One decoder block holding this TP rank's shards (see the module docstring)."""

    def __init__(self, ref_block, cfg: ModelConfig, grid: Grid, ops: Ops, sp: bool, dtype,
                 device):
        super().__init__()
        tp, r = grid.tp, grid.tp_rank
        self.cfg, self.grid, self.ops, self.sp = cfg, grid, ops, sp and tp > 1
        self.hq, self.hkv = cfg.n_heads // tp, cfg.n_kv_heads // tp
        a, m = ref_block.attn, ref_block.mlp
        self.attn_norm = _param(ref_block.attn_norm.weight, dtype, device, replicated=True,
                                sp=self.sp)
        self.mlp_norm = _param(ref_block.mlp_norm.weight, dtype, device, replicated=True,
                               sp=self.sp)
        # merged gate-up: [W_gate rows of rank r ; W_up rows of rank r], as linear_swiglu wants
        self.w_gate_up = _param(torch.cat([_rows(m.w_gate.weight, r, tp),
                                           _rows(m.w_up.weight, r, tp)]), dtype, device)
        self.tp_layers = ops.tp_layers if tp > 1 else None
        if self.tp_layers is not None:
            # haillm.parallel's layers: the merged QKV is one ColumnParallelLinear whose parts
            # (q, k, v) are split separately, so each rank keeps its own heads of each; they
            # run the SP all-gather / reduce-scatter themselves, overlapped with the GEMMs
            col, row = self.tp_layers
            hd, nq, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
            full = nn.Linear(cfg.hidden_size, (nq + 2 * nkv) * hd, bias=False)
            with torch.no_grad():
                full.weight.copy_(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
            kw = dict(group=grid.tp_group, sequence_parallel=self.sp, seq_dim=1)
            ov = ops.tp_overlap
            self.qkv = col.from_full(full, partition_sizes=[nq * hd, nkv * hd, nkv * hd],
                                     overlap_grad_comm=ov, overlap_sp_comm=ov and self.sp, **kw)
            self.o_proj = row.from_full(a.wo, overlap_sp_comm=ov and self.sp, **kw)
            self.down_proj = row.from_full(m.w_down, overlap_sp_comm=ov and self.sp, **kw)
            self.to(device=device, dtype=dtype)
        else:  # tp = 1: the plain weights, merged QKV
            self._wqkv = _param(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]), dtype,
                                device)
            self._wo = _param(a.wo.weight, dtype, device)
            self._w_down = _param(m.w_down.weight, dtype, device)

    # the weights, whichever layers hold them: (out/tp, in) and (out, in/tp) slices
    @property
    def wqkv(self):
        return self.qkv.weight if self.tp_layers else self._wqkv

    @property
    def wo(self):
        return self.o_proj.weight if self.tp_layers else self._wo

    @property
    def w_down(self):
        return self.down_proj.weight if self.tp_layers else self._w_down

    def _enter(self, x):  # column-parallel input: gather the sequence (SP) or Megatron f
        g = self.grid.tp_group
        return gather_seq(x, g) if self.sp else copy_to_tp(x, g)

    def forward(self, h, residual, cos, sin):
        """h, residual: (B, S_local, d) -> (h', residual'); residual None on the first block."""
        eps, hd = self.cfg.norm_eps, self.cfg.head_dim
        if residual is None:
            residual = h
            x = self.ops.rms_norm(h, self.attn_norm, eps)
        else:
            x, residual = self.ops.rms_norm(h, self.attn_norm, eps, residual=residual)
        if self.tp_layers:
            qkv = self.qkv(x)  # SP all-gather (or Megatron f) inside: (B, S, local q|k|v)
        else:
            qkv = F.linear(x, self.wqkv)  # (B, S, q|k|v)
        q, k, v = qkv.split([self.hq * hd, self.hkv * hd, self.hkv * hd], dim=-1)
        q = rearrange(q, "b s (h d) -> b s h d", d=hd)
        k = rearrange(k, "b s (h d) -> b s h d", d=hd)
        v = rearrange(v, "b s (h d) -> b s h d", d=hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self.ops.attn(q.contiguous(), k.contiguous(), v.contiguous())  # (B, S, Hq_l, D)
        o = rearrange(o, "b s h d -> b s (h d)")
        h = self.o_proj(o) if self.tp_layers else F.linear(o, self.wo)
        x, residual = self.ops.rms_norm(h, self.mlp_norm, eps, residual=residual)
        a = self.ops.swiglu(self._enter(x), self.w_gate_up)  # fused GEMM: (B, S, f/tp)
        h = self.down_proj(a) if self.tp_layers else F.linear(a, self.w_down)
        return h, residual


class StageModel(nn.Module):
    """The layers `layer_ids` of the model on this rank (+ embedding / head+loss at the ends).

    `forward(x, targets)`: first stage x = tokens (B, S) int64, else the residual stream
    (B, S_local, d); returns the residual stream, or on the last stage the mean loss.
    """

    def __init__(self, ref: DeepSeekLM, layer_ids, grid: Grid, ops: Ops, *, first: bool,
                 last: bool, sequence_parallel: bool, dtype=torch.float32, device="cpu"):
        super().__init__()
        cfg, tp, r = ref.cfg, grid.tp, grid.tp_rank
        self.cfg, self.grid, self.ops, self.first, self.last = cfg, grid, ops, first, last
        self.sp = sequence_parallel and tp > 1
        self.layer_ids = list(layer_ids)
        if first:
            with _materialized(ref, "embed."):
                self.embed = _param(_rows(ref.embed.weight, r, tp), dtype, device)
        blocks = []
        for i in layer_ids:
            with _materialized(ref, f"layers.{i}."):
                blocks.append(ParallelBlock(ref.layers[i], cfg, grid, ops, sequence_parallel,
                                            dtype, device))
        self.layers = nn.ModuleList(blocks)
        if last:
            with _materialized(ref, "norm."), _materialized(ref, "head."):
                self.norm = _param(ref.norm.weight, dtype, device, replicated=True, sp=self.sp)
                self.head = _param(_rows(ref.head.weight, r, tp), dtype, device)

    def _embed(self, tokens):
        g, tp = self.grid.tp_group, self.grid.tp
        if tp == 1:
            return F.embedding(tokens, self.embed)
        vshard = self.embed.shape[0]
        start = self.grid.tp_rank * vshard
        local = (tokens >= start) & (tokens < start + vshard)
        e = F.embedding((tokens - start).clamp(0, vshard - 1), self.embed)
        e = e * local[..., None].to(e.dtype)  # (B, S, d): rows other ranks own are zero
        return scatter_seq_reduce(e, g) if self.sp else reduce_from_tp(e, g)

    def forward(self, x, targets=None):
        # full sequence length: tokens (B, S), or a residual stream sharded along S under SP
        s_full = x.shape[1] * (self.grid.tp if (x.dim() == 3 and self.sp) else 1)
        cos, sin = rope_cache(s_full, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        h = self._embed(x) if self.first else x
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin)
        if residual is not None:
            h = h + residual  # the residual stream: what the next stage (or the head) reads
        if not self.last:
            return h  # (B, S_local, d); the pipeline executor sends a dense copy if needed
        y = self.ops.rms_norm(h, self.norm, self.cfg.norm_eps)
        g = self.grid.tp_group
        y = gather_seq(y, g) if self.sp else copy_to_tp(y, g)  # (B, S, d)
        logits = F.linear(y, self.head).flatten(0, 1)  # (B*S, V/tp)
        if targets is None:
            return logits
        return self.loss(logits, targets)

    def loss(self, logits, targets):
        """Mean cross-entropy of `logits` (B*S, V/tp) against `targets` (B, S) (last stage)."""
        t = targets.flatten()
        if self.grid.tp > 1:
            return self.ops.vocab_parallel_ce(logits, t, group=self.grid.tp_group)
        return self.ops.cross_entropy(logits, t)


@torch.no_grad()
def gather_full_state(stage: StageModel) -> dict[str, torch.Tensor]:
    """This stage's weights un-sharded over TP, named as in `reference.DeepSeekLM` (fp32).

    Collective over the TP group. Inverse of the slicing in the constructors.
    """
    import torch.distributed as dist

    g, tp, cfg = stage.grid.tp_group, stage.grid.tp, stage.cfg

    def full(t, dim):
        t = t.detach().float().contiguous()
        if tp == 1:
            return [t]
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t, group=g)
        return parts

    out: dict[str, torch.Tensor] = {}
    hd = cfg.head_dim
    if stage.first:
        out["embed.weight"] = torch.cat(full(stage.embed, 0))
    for i, blk in zip(stage.layer_ids, stage.layers):
        p = f"layers.{i}."
        qkv = full(blk.wqkv, 0)
        split = [blk.hq * hd, blk.hkv * hd, blk.hkv * hd]
        for j, name in enumerate(("wq", "wk", "wv")):
            out[p + f"attn.{name}.weight"] = torch.cat([t.split(split)[j] for t in qkv])
        out[p + "attn.wo.weight"] = torch.cat(full(blk.wo, 1), dim=1)
        gu = full(blk.w_gate_up, 0)
        out[p + "mlp.w_gate.weight"] = torch.cat([t.chunk(2)[0] for t in gu])
        out[p + "mlp.w_up.weight"] = torch.cat([t.chunk(2)[1] for t in gu])
        out[p + "mlp.w_down.weight"] = torch.cat(full(blk.w_down, 1), dim=1)
        out[p + "attn_norm.weight"] = blk.attn_norm.detach().float().clone()
        out[p + "mlp_norm.weight"] = blk.mlp_norm.detach().float().clone()
    if stage.last:
        out["norm.weight"] = stage.norm.detach().float().clone()
        out["head.weight"] = torch.cat(full(stage.head, 0))
    return out
