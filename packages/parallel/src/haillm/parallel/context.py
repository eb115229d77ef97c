"""Context parallelism: ring attention over the sequence (Liu et al. 2023, arXiv 2310.01889).

Megatron's sequence parallelism splits the *activations between* the attention and MLP blocks
along the sequence, but every rank still runs attention over the whole sequence. Context
parallelism (CP) splits attention itself: each of the `cp` ranks of the group holds a shard of
the sequence of q, k and v, and the K/V shards travel around a ring of ranks:

* step i (i = 0 … cp-1): rank r holds the K/V shard of rank (r - i) mod cp; it computes the
  attention of its queries against that block with `flash_attention(..., return_lse=True)`
  while the block it will need next is already in flight (one `batch_isend_irecv` per step:
  send to r+1, receive from r-1);
* partial results merge by their logsumexp, in fp32 (fp64 for fp64 inputs)::

      lse = logaddexp(lse_a, lse_b)
      out = out_a · exp(lse_a - lse) + out_b · exp(lse_b - lse)

* backward (an autograd.Function of its own, FlashAttention-2 style): the K/V blocks travel
  the ring again; each block's probabilities are *recomputed* from the saved (out, lse) of the
  merged result (`flash_attention_backward`); dQ accumulates locally, and each block's dK/dV
  accumulator travels with it, one hop behind, collecting every rank's share until a last hop
  brings it home to the rank that owns that K/V shard.

Causal attention with the *zigzag* layout (`load_balance=True`, as Megatron-core): the
sequence is cut into 2·cp chunks and rank r holds chunks r and 2cp-1-r. Then with c the chunk
length every step costs the same 2·c² scores on every rank: step 0 is the (2c × 2c) causal
diagonal block; a K/V shard from an earlier rank (src < r) is seen only through its first chunk
by all 2c queries; one from a later rank (src > r) is seen only by the second query chunk, but
through both of its chunks. Fully masked blocks are never computed. With contiguous shards
(`load_balance=False`) rank r would skip the r+1 … cp-1 later shards and rank cp-1 would do
cp times the work of rank 0.

GQA without copies: K/V keep their `nheads_kv` heads on the wire and in the kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .comm import group_rank, group_size
from .mappings import gather_along
from .trace import span

__all__ = ["context_parallel_attention", "gather_sequence", "split_sequence"]

_TAG_KV, _TAG_DKV = 17, 18


# ---------------------------------------------------------------------------- layout
def _check_seq(n: int, cp: int, load_balance: bool, what: str, fn: str) -> None:
    parts = 2 * cp if load_balance else cp
    if n % parts:
        how = (f"2*cp = {parts} with load_balance=True (zigzag: 2*cp equal chunks)"
               if load_balance else f"cp = {parts} with load_balance=False")
        raise ValueError(f"{fn}: {what} ({n}) must be divisible by {how}; pad the sequence to a "
                         f"multiple of {parts}")


def _dim(x: torch.Tensor, dim: int) -> int:
    return dim % x.dim()


def split_sequence(x: torch.Tensor, *, dim: int = 1, group: Any = None,
                   load_balance: bool = True) -> torch.Tensor:
    """This rank's shard of a whole sequence that every rank of `group` holds.

    Args:
        x: the whole sequence along `dim` (e.g. (batch, seqlen, ...) tokens or activations).
        dim: the sequence dimension.
        group: the context-parallel group (default: the world; degree 1 returns x).
        load_balance: True: cut into 2·cp chunks, rank r gets chunks r and 2cp-1-r (zigzag);
            False: the r-th of cp contiguous slices.

    Returns:
        (…, seqlen / cp, …), contiguous. Differentiable: the gradient is this rank's slice.

    Raises:
        ValueError: seqlen is not divisible by 2·cp (zigzag) or by cp (contiguous).
    """
    cp = group_size(group)
    if cp == 1:
        return x
    d = _dim(x, dim)
    n = x.shape[d]
    _check_seq(n, cp, load_balance, f"x.shape[{dim}] (the sequence length)", "split_sequence")
    r = group_rank(group)
    if not load_balance:
        s = n // cp
        return x.narrow(d, r * s, s).contiguous()
    c = n // (2 * cp)
    return torch.cat([x.narrow(d, r * c, c), x.narrow(d, (2 * cp - 1 - r) * c, c)], dim=d)


def _unzigzag(full: torch.Tensor, d: int, cp: int) -> torch.Tensor:
    """Gathered shards in rank order [0, 2cp-1, 1, 2cp-2, …] → chunks in sequence order."""
    chunks = full.chunk(2 * cp, dim=d)
    order = [2 * j if j < cp else 2 * (2 * cp - 1 - j) + 1 for j in range(2 * cp)]
    return torch.cat([chunks[i] for i in order], dim=d)


class _GatherSequence(torch.autograd.Function):
    """All-gather the shards into the whole sequence; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, dim, group, load_balance):
        ctx.args = (dim, group, load_balance)
        cp = group_size(group)
        full = gather_along(x, dim, group)
        return _unzigzag(full, dim, cp).contiguous() if load_balance else full.contiguous()

    @staticmethod
    def backward(ctx, grad):
        dim, group, load_balance = ctx.args
        return split_sequence(grad, dim=dim, group=group, load_balance=load_balance), None, None, None


def gather_sequence(x: torch.Tensor, *, dim: int = 1, group: Any = None,
                    load_balance: bool = True) -> torch.Tensor:
    """The whole sequence from every rank's shard (the inverse of `split_sequence`).

    Args:
        x: this rank's shard (…, seqlen / cp, …) along `dim`, laid out by `split_sequence`.
        dim, group, load_balance: as in `split_sequence`.

    Returns:
        (…, seqlen, …) on every rank. Differentiable: as Megatron's gather regions, the
        backward keeps this rank's slice of the gradient (the computation after the gather is
        assumed to be replicated on every rank of the group).

    Raises:
        ValueError: with load_balance=True, the shard length is odd (it holds two chunks).
    """
    cp = group_size(group)
    if cp == 1:
        return x
    d = _dim(x, dim)
    if load_balance and x.shape[d] % 2:
        raise ValueError(f"gather_sequence: x.shape[{dim}] (this rank's shard, {x.shape[d]}) "
                         "must be even with load_balance=True: a zigzag shard is two chunks")
    return _GatherSequence.apply(x, d, group, load_balance)


# ---------------------------------------------------------------------------- the ring
class _Ring:
    """Neighbours on the ring of `group`: send to group rank r+1, receive from r-1."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size, self.rank = group_size(group), group_rank(group)
        glob = (lambda i: i) if group is None else (lambda i: dist.get_global_rank(group, i))
        self.next = glob((self.rank + 1) % self.size)
        self.prev = glob((self.rank - 1) % self.size)

    def exchange(self, t: torch.Tensor, tag: int):
        """Start sending `t` to the next rank and receiving a tensor like it from the previous.

        Returns (the receive buffer, the works): `wait()` on every work before reading the
        buffer or writing `t`."""
        buf = torch.empty_like(t)
        ops = [dist.P2POp(dist.isend, t, self.next, group=self.group, tag=tag),
               dist.P2POp(dist.irecv, buf, self.prev, group=self.group, tag=tag)]
        return buf, (dist.batch_isend_irecv(ops), t)


def _wait(pending) -> None:
    """Wait for a step's P2P; under a `Tracer` the time spent here is the *exposed*
    communication (what the block computation did not hide), event "cp_wait"."""
    works, _keep_alive = pending
    with span("comm", "cp_wait"):
        for w in works:
            w.wait()


_ALL = slice(None)


def _block(i: int, src: int, r: int, seqlen: int, causal: bool, load_balance: bool):
    """(query rows, key rows, causal) of this rank's queries vs the K/V shard of rank `src` at
    ring step i; None when that block is entirely masked."""
    if not causal:
        return _ALL, _ALL, False
    if i == 0:  # own shard: causal within (zigzag: chunk r before chunk 2cp-1-r, still causal)
        return _ALL, _ALL, True
    if not load_balance:
        return (_ALL, _ALL, False) if src < r else None
    c = seqlen // 2
    if src < r:  # chunks src < r < 2cp-1-r < 2cp-1-src: only K chunk src is visible, to all Q
        return _ALL, slice(0, c), False
    return slice(c, seqlen), _ALL, False  # src > r: only Q chunk 2cp-1-r sees, both K chunks


def _merge(out, lse, o_b, l_b):
    """Merge a partial attention (o_b, l_b) into (out, lse), all in the accumulation dtype.

    out, o_b (B, S, H, D); lse, l_b (B, H, S). Rows of a partial that saw no key (l = +inf by
    flash_attention's convention) carry no weight."""
    inf = float("inf")
    l_b = torch.where(l_b == inf, -inf, l_b)
    new = torch.logaddexp(lse, l_b)
    safe = torch.where(new == -inf, 0.0, new)
    w_a = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    w_b = torch.exp(l_b - safe).transpose(1, 2).unsqueeze(-1)
    return out * w_a + o_b * w_b, new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, load_balance, impl):
        from haillm.flashattn import flash_attention

        ring = _Ring(group)
        cp, r = ring.size, ring.rank
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, S, H, D = q.shape
        out = torch.zeros(B, S, H, D, dtype=acc, device=q.device)
        lse = torch.full((B, H, S), float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v])  # (2, B, S, Hkv, D): one message per step
        for i in range(cp):
            if i + 1 < cp:
                nxt, pending = ring.exchange(kv, _TAG_KV)  # in flight during this block
            blk = _block(i, (r - i) % cp, r, S, causal, load_balance)
            if blk is not None:
                qs, ks, bc = blk
                with span("compute", "cp_block_fwd"):
                    o_b, l_b = flash_attention(q[:, qs], kv[0][:, ks], kv[1][:, ks], causal=bc,
                                               softmax_scale=scale, impl=impl, return_lse=True)
                    out[:, qs], lse[:, :, qs] = _merge(out[:, qs], lse[:, :, qs], o_b.to(acc),
                                                       l_b.to(acc))
            if i + 1 < cp:
                _wait(pending)
                # the sent block is free once its send is done: drop the pending's reference
                # so that only two K/V buffers (this block, the one in flight) ever coexist
                kv, pending = nxt, None
        lse = torch.where(lse == float("-inf"), float("inf"), lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, group, load_balance, impl)
        return out

    @staticmethod
    def backward(ctx, dout):
        from haillm.flashattn import flash_attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, group, load_balance, impl = ctx.args
        ring = _Ring(group)
        cp, r = ring.size, ring.rank
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        S = q.shape[1]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        dkv_recv, dkv_pending = None, None
        for i in range(cp):
            if i + 1 < cp:
                nxt, kv_pending = ring.exchange(kv, _TAG_KV)
            blk = _block(i, (r - i) % cp, r, S, causal, load_balance)
            if blk is not None:
                qs, ks, bc = blk
                with span("compute", "cp_block_bwd"):
                    dq_b, dk_b, dv_b = flash_attention_backward(
                        dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs],
                        lse[:, :, qs], causal=bc, softmax_scale=scale, impl=impl)
                    dq[:, qs] += dq_b.to(acc)
            # The dK/dV accumulator of the K/V block held now arrives one hop behind it.
            if dkv_recv is None:
                dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
            else:
                _wait(dkv_pending)  # and drop the sent accumulator (two fp32 dK/dV at most)
                dkv, dkv_recv, dkv_pending = dkv_recv, None, None
            if blk is not None:
                dkv[0][:, ks] += dk_b.to(acc)
                dkv[1][:, ks] += dv_b.to(acc)
            dkv_recv, dkv_pending = ring.exchange(dkv, _TAG_DKV)
            del dkv  # held by dkv_pending until its send is waited on
            if i + 1 < cp:
                _wait(kv_pending)
                kv, kv_pending = nxt, None
        _wait(dkv_pending)  # the last hop brings every block's gradient home
        return (dq.to(q.dtype), dkv_recv[0].to(k.dtype), dkv_recv[1].to(v.dtype),
                None, None, None, None, None)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               causal: bool = False, softmax_scale: float | None = None,
                               group: Any = None, load_balance: bool = True,
                               impl: str = "auto") -> torch.Tensor:
    """Ring attention: this rank's queries against the whole sequence's keys and values.

    Args:
        q: (batch, seqlen / cp, nheads, headdim), this rank's shard (`split_sequence`).
        k, v: (batch, seqlen / cp, nheads_kv, headdim), the same rows of the sequence;
            nheads % nheads_kv == 0 (GQA: K/V are never repeated).
        causal: causal over the *whole* sequence (query i sees key j iff j <= i).
        softmax_scale: defaults to 1/sqrt(headdim).
        group: the context-parallel group (default: the world). Degree 1 is `flash_attention`.
        load_balance: the layout of the shards, as given to `split_sequence` (True: zigzag).
        impl: the block attention's implementation, passed to `flash_attention` and
            `flash_attention_backward` ("auto", "tiled", "triton", "reference").

    Returns:
        (batch, seqlen / cp, nheads, headdim) in q.dtype: this rank's shard of
        `flash_attention` over the whole sequence; differentiable in q, k and v.

    Raises:
        ValueError: shapes that do not match, or (zigzag, cp > 1) an odd shard length.
    """
    from haillm.flashattn import flash_attention
    from haillm.flashattn.checks import check_qkv

    cp = group_size(group)
    if cp == 1:
        return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, impl=impl)
    check_qkv(q, k, v, impl=impl)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"context_parallel_attention: q, k and v must be shards of one sequence: "
                         f"q.shape[1] ({q.shape[1]}) must equal k.shape[1] ({k.shape[1]})")
    if load_balance and q.shape[1] % 2:
        raise ValueError(
            f"context_parallel_attention: q.shape[1] (this rank's shard, {q.shape[1]}) must be "
            f"even with load_balance=True: the whole sequence is cut in 2*cp = {2 * cp} chunks "
            "and each rank holds two (split_sequence checks the whole length)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _RingAttention.apply(q, k, v, bool(causal), scale, group, bool(load_balance), impl)
