"""The DeepSeek LLM decoder in plain single-process PyTorch: the spec of the parallel model.

Pre-norm decoder blocks (paper section 2.2, the LLaMA design): RMSNorm -> attention with RoPE
(optionally grouped-query) -> residual add; RMSNorm -> SwiGLU MLP -> residual add; a final
RMSNorm and an untied output head. Every weight is drawn from N(0, 0.006^2) (the paper's init
std); norm weights start at 1. Nothing here is fused or parallel: attention materialises the
score matrix, the norm is three lines, the projections are `nn.Linear`.

The parallel model (`haillm.trainer.model`) is built *from* an instance of this class (every
rank constructs it from the same seed and keeps its own shards), and the composition test
proves that it computes the same losses. The real one adds TP/SP sharding, pipeline stages,
fused kernels and mixed precision.

Initialisation is per parameter: parameter `name` is drawn from a generator seeded by
(seed, name) alone, never from a shared random stream. So the model can be built *lazily* (on
the meta device: structure, no memory) and any rank can materialise just the parameters it
needs, one layer at a time, and still get exactly the values of the eager model. That is how a
pipeline stage of a 67B model is built without ever holding the whole model on one rank.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from haillm.trainer.config import ModelConfig

__all__ = ["Attention", "Block", "DeepSeekLM", "MLP", "RMSNorm", "apply_rope", "init_value",
           "rope_cache"]


def init_value(cfg: ModelConfig, seed: int, name: str, shape) -> torch.Tensor:
    """The initial fp32 value of parameter `name` (CPU): norm weights 1, every other weight
    N(0, init_std^2) from a generator seeded by (seed, name) only (the same on every rank, in
    any order of materialisation)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, cfg.init_std, generator=g)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None):
    """cos and sin tables, each (seq_len, head_dim), in fp32 (the rotate-half layout)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                          / head_dim)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv)  # (S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, S, H, D) by the position angles; computed in fp32, returned in x.dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, D)
    return (xf * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE; `n_kv_heads < n_heads` is grouped-query."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.wq(x), "b s (h d) -> b s h d", d=self.head_dim)
        k = rearrange(self.wk(x), "b s (h d) -> b s h d", d=self.head_dim)
        v = rearrange(self.wv(x), "b s (h d) -> b s h d", d=self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # GQA
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / self.head_dim**0.5
        s = x.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        p = scores.masked_fill(mask, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(x.dtype)  # (B, S, H, D)
        return self.wo(rearrange(o, "b s h d -> b s (h d)"))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.w_gate = nn.Linear(d, f, bias=False)
        self.w_up = nn.Linear(d, f, bias=False)
        self.w_down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class DeepSeekLM(nn.Module):
    """The whole decoder. `forward(tokens)` -> logits (B, S, V); with targets -> mean loss."""

    def __init__(self, cfg: ModelConfig, *, seed: int | None = None, lazy: bool = False):
        """`seed`: None draws one from torch's global generator. `lazy`: leave every parameter
        on the meta device (no memory); `materialize_` gives them their values later."""
        super().__init__()
        self.cfg = cfg
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        with torch.device("meta"):  # the structure only: no memory, no random numbers drawn
            # `_weight` skips Embedding's normal_() init, which on the meta device runs through
            # torch's Python decompositions (importing torch._refs/_prims: ~20 s per process
            # without a bytecode cache); init_value gives every parameter its value anyway.
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size)))
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if not lazy:
            self.materialize_()

    def materialize_(self, prefix: str = "") -> list[str]:
        """Give the meta parameters whose name starts with `prefix` their initial values (CPU,
        fp32). Returns the names materialised (for `release_`)."""
        done = []
        for name, p in list(self.named_parameters()):
            if name.startswith(prefix) and p.is_meta:
                owner, attr = self._owner(name)
                setattr(owner, attr, nn.Parameter(init_value(self.cfg, self.seed, name, p.shape)))
                done.append(name)
        return done

    def release_(self, names: list[str]) -> None:
        """Put parameters `names` back on the meta device (frees their memory)."""
        for name in names:
            owner, attr = self._owner(name)
            p = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(torch.empty(p.shape, device="meta")))

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, attr = name.rpartition(".")
        return self.get_submodule(path), attr

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens (B, S) int64 -> logits (B, S, V), or the mean cross-entropy with targets."""
        s = tokens.shape[1]
        cos, sin = rope_cache(s, self.cfg.head_dim, self.cfg.rope_theta, tokens.device)
        x = self.embed(tokens)  # (B, S, d)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.head(self.norm(x))  # (B, S, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations of `tokens` (B, S) (no KV cache: the teaching version)."""
        for _ in range(max_new_tokens):
            ctx = tokens[:, -self.cfg.seq_len:]
            logits = self(ctx)[:, -1].float()  # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens
