"""The kernels the model calls, resolved once: the packages' fused ops, or a plain fallback.

`Ops(parallel_cfg)` picks, for each operation, the haillm package implementation (the
contract in ARCHITECTURE.md) when the feature is switched on and the package provides it,
else the plain-PyTorch version below. A fused path that is switched on but cannot be found
falls back *with a warning* (never silently), and `Ops.wiring` says what runs, which the
trainer prints at start-up.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from haillm.trainer.config import ParallelConfig

__all__ = ["Ops", "plain_attention", "plain_rms_norm", "plain_swiglu",
           "plain_vocab_parallel_cross_entropy"]


# --------------------------------------------------------------------------- plain versions
def plain_attention(q, k, v, *, causal=True, softmax_scale=None, impl="auto"):
    """q (B, S, H, D), k/v (B, S, Hkv, D) -> (B, S, H, D); scores materialised, fp32 softmax."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scale = softmax_scale or q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


def plain_rms_norm(x, weight, eps=1e-6, *, residual=None, impl="auto"):
    """RMSNorm over the last dim; with `residual` returns (norm(x + r), x + r)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return (y, x) if residual is not None else y


def plain_swiglu(x, w_gate_up, *, impl="auto"):
    """silu(x @ Wg.T) * (x @ Wu.T) with w_gate_up = cat([Wg, Wu]) (2N, K)."""
    g, u = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.silu(g) * u


def plain_cross_entropy(logits, target, *, ignore_index=-100, reduction="mean", impl="auto"):
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits sharded along the vocabulary (Megatron): 3 all-reduces of (N,)."""

    @staticmethod
    def forward(ctx, logits, target, group):
        x = logits.float()  # (N, V/tp)
        vshard = x.shape[-1]
        start = dist.get_rank(group) * vshard
        m = x.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        x = x - m[:, None]
        local = (target >= start) & (target < start + vshard)
        idx = (target - start).clamp(0, vshard - 1)
        picked = x.gather(1, idx[:, None]).squeeze(1) * local  # (N,)
        e = x.exp()
        sumexp = e.sum(-1)
        both = torch.stack([picked, sumexp])
        dist.all_reduce(both, group=group)
        picked, sumexp = both
        loss = sumexp.log() - picked  # (N,)
        p = e / sumexp[:, None]
        ctx.save_for_backward(p, idx, local)
        ctx.dtype = logits.dtype
        return loss.mean()

    @staticmethod
    def backward(ctx, g):
        p, idx, local = ctx.saved_tensors
        grad = p.clone()
        grad.scatter_add_(1, idx[:, None], -local.float()[:, None])
        return (grad * (g / p.shape[0])).to(ctx.dtype), None, None


def plain_vocab_parallel_cross_entropy(logits_shard, target, *, group=None, ignore_index=-100):
    """Mean cross-entropy of `logits_shard` (N, V/tp) against global `target` (N,)."""
    return _VocabParallelCE.apply(logits_shard, target, group)


# --------------------------------------------------------------------------- resolution
def _find(module: str, name: str):
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError):
        return None


class Ops:
    """The operations of one run, chosen from the config's switches and what is installed.

    Attributes:
        wiring: `{operation: "haillm.pkg.fn" | "fallback: ..." | "off: ..."}`.
    """

    def __init__(self, p: ParallelConfig, *, warn: bool = True):
        self.wiring: dict[str, str] = {}
        self.attention_impl = p.attention
        missing: list[str] = []

        def pick(key, on, module, name, fallback, off_note):
            if not on:
                self.wiring[key] = f"off: {off_note}"
                return fallback
            fn = _find(module, name)
            if fn is None:
                self.wiring[key] = f"fallback: trainer plain PyTorch ({module}.{name} missing)"
                missing.append(f"{module}.{name}")
                return fallback
            self.wiring[key] = f"{module}.{name}"
            return fn

        use_ref_attn = p.attention == "reference"
        self.attention = pick("attention", not use_ref_attn, "haillm.flashattn",
                              "flash_attention", plain_attention, "reference attention")
        self.rms_norm = pick("rms_norm", p.fused_norm, "haillm.fusedops", "rms_norm",
                             plain_rms_norm, "plain RMSNorm")
        self.swiglu = pick("swiglu", p.fused_swiglu, "haillm.fusedops", "linear_swiglu",
                           plain_swiglu, "merged GEMM then silu*up")
        self.cross_entropy = pick("cross_entropy", p.fused_cross_entropy, "haillm.fusedops",
                                  "inplace_cross_entropy", plain_cross_entropy,
                                  "F.cross_entropy on fp32 logits")
        self.vocab_parallel_ce = pick("vocab_parallel_cross_entropy", p.tp > 1,
                                      "haillm.parallel", "vocab_parallel_cross_entropy",
                                      plain_vocab_parallel_cross_entropy, "tp = 1")

        if missing and warn:
            warnings.warn(f"not installed, the trainer runs its plain-PyTorch fallback instead: "
                          f"{', '.join(missing)}", stacklevel=2)
        # tensor-parallel layers: haillm.parallel's Column/RowParallelLinear when installed
        self.tp_layers = None
        self.tp_overlap = p.tp_comm_overlap
        if p.tp > 1 and p.tp_layers in ("auto", "package"):
            col = _find("haillm.parallel", "ColumnParallelLinear")
            row = _find("haillm.parallel", "RowParallelLinear")
            if col is not None and row is not None:
                self.tp_layers = (col, row)
                self.wiring["tp layers"] = ("haillm.parallel Column/RowParallelLinear (merged QKV, "
                                            f"comm overlap {'on' if p.tp_comm_overlap else 'off'})"
                                            " + trainer SP regions around linear_swiglu")
            elif p.tp_layers == "package":
                raise ImportError("parallel.tp_layers=package but haillm.parallel has no "
                                  "ColumnParallelLinear")
            else:
                self.wiring["tp layers"] = "fallback: trainer TP/SP regions (haillm.parallel " \
                                           "layers missing)"
                if warn:
                    warnings.warn("haillm.parallel.ColumnParallelLinear is not available; the "
                                  "trainer uses its own TP/SP regions", stacklevel=2)
        elif p.tp > 1:
            self.wiring["tp layers"] = "trainer TP/SP regions"

    def attn(self, q, k, v):
        """Causal attention (B, S, H, D) with the configured impl."""
        if self.attention is plain_attention:
            return plain_attention(q, k, v, causal=True)
        return self.attention(q, k, v, causal=True, impl=self.attention_impl)
