"""`DeepSeekLM`: the DeepSeek LLM decoder, the one model class of the trainer.

Pre-norm decoder blocks (paper section 2.2, the LLaMA design): RMSNorm -> attention with RoPE
(grouped-query when `n_kv_heads < n_heads`) -> residual add; RMSNorm -> SwiGLU MLP -> residual
add; a final RMSNorm and an untied output head. Weights start from N(0, 0.006^2) (the paper's
init std), norm weights at 1.

As built, the model is the plain single-process spec: `nn.Linear` projections, the norms'
and the SwiGLU's reference paths, `flash_attention(impl="reference")` (the score matrix,
materialised). `parallelize` (haillm.trainer.parallelize) turns the *same* modules into one
rank's share of a dp x cp x tp x pp run: fused kernels, `haillm.parallel` layers, ring
attention over the sequence (CP), pipeline chunks.
Nothing here repeats K/V or writes an attention softmax; the parameter names (`shard_plan`)
never depend on the layout.

Two projections are merged (DeepSeek section 2.4, "fuse GEMMs"): `attn.wqkv` = [Wq; Wk; Wv]
(unequal widths under GQA) and `mlp.w_gate_up` = [W_gate; W_up]. Each part is initialised
under its own name, so the values equal those of separate layers.

Initialisation is per parameter: parameter `name` is drawn from a generator seeded by
(seed, name) alone, never from a shared random stream. The model is therefore built on the
*meta* device (structure, no memory) and any rank materialises just the slices it owns, one
parameter at a time, with exactly the values of the eager model: how a pipeline stage of a
67B model is built without ever holding the whole model.

A pipeline chunk is a `DeepSeekLM` too (`stage`): some of the layers, the embedding only on
the first, the final norm and head only on the last (torchtitan's model-splitting).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from haillm.flashattn import flash_attention
from haillm.fusedops import RMSNorm, cross_entropy_reference, linear_swiglu
from haillm.parallel import context_parallel_attention, split_sequence
from haillm.trainer.config import ModelConfig
from haillm.trainer.shard_plan import ParamSpec, param_specs

__all__ = ["Attention", "Block", "DeepSeekLM", "KVCache", "MLP", "apply_rope", "init_value",
           "rope_cache", "sample_next", "swiglu"]


def _draw(cfg: ModelConfig, seed: int, name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, cfg.init_std, generator=g)


def init_value(cfg: ModelConfig, seed: int, name: str, spec: ParamSpec | None = None
               ) -> torch.Tensor:
    """The initial full fp32 value of parameter `name` (CPU): norm weights 1, every other
    weight N(0, init_std^2), each merged part from a generator seeded by (seed, part name)
    only (the same on every rank, in any order of materialisation)."""
    spec = spec or param_specs(cfg)[name]
    if name.endswith("norm.weight"):
        return torch.ones(spec.shape)
    if spec.parts:
        return torch.cat([_draw(cfg, seed, part, (rows, *spec.shape[1:]))
                          for part, rows in spec.parts])
    return _draw(cfg, seed, name, spec.shape)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None, *, start: int = 0,
               positions: torch.Tensor | None = None):
    """cos and sin of positions [start, start + seq_len), or of the given `positions`
    (seq_len,) (a context-parallel rank's zigzag chunks are not contiguous), each
    (seq_len, head_dim), fp32 (the rotate-half layout of LLaMA and Hugging Face's Llama)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                          / head_dim)
    if positions is None:
        t = torch.arange(start, start + seq_len, dtype=torch.float32, device=device)
    else:
        if positions.shape != (seq_len,):
            raise ValueError(f"rope_cache: positions of shape {tuple(positions.shape)}, "
                             f"expected ({seq_len},)")
        t = positions.to(device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)  # (S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, S, H, D) by the position angles; computed in fp32 (fp64 for an fp64
    model), returned in x.dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, D)
    return (xf * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys (after RoPE) and values of every layer: (B, S_max, H_kv, D) each; `length` used."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.length, self.max_len = 0, max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, T, H_kv, D) at `length`; returns the layer's keys and values so far,
        (B, length + T, H_kv, D) each (views: nothing copied but the new positions)."""
        s, t = self.length, k.shape[1]
        self.k[layer][:, s:s + t] = k
        self.v[layer][:, s:s + t] = v
        return self.k[layer][:, :s + t], self.v[layer][:, :s + t]


class Attention(nn.Module):
    """Causal attention with RoPE through `haillm.flashattn.flash_attention` (GQA without
    copying K/V). Head counts are this rank's (`parallelize` divides them by tp).

    Under context parallelism (`cp_group` set by `parallelize`, step 3) x holds this rank's
    zigzag shard of the sequence and attention is `haillm.parallel.context_parallel_attention`:
    ring attention (Liu et al. 2023) with `impl` for its block computations."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.layer_id = layer_id
        self.impl = "reference"  # the readable spec; parallelize picks the configured one
        self.cp_group = None  # the context-parallel group (None: the whole sequence is here)
        self.wqkv = nn.Linear(d, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, S, d) (under SP: (B, S/tp, d), gathered by `wqkv`; under CP S is this rank's
        S/cp tokens, and cos, sin are of their positions) -> (B, S[/tp], d)."""
        hd = self.head_dim
        qkv = self.wqkv(x)  # (B, S, (Hq + 2 Hkv) D): this rank's heads of q, k and v
        q, k, v = qkv.split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], -1)
        q = rearrange(q, "b s (h d) -> b s h d", d=hd)
        k = rearrange(k, "b s (h d) -> b s h d", d=hd)
        v = rearrange(v, "b s (h d) -> b s h d", d=hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cp_group is not None:
            if cache is not None:
                raise ValueError("Attention: a KV cache (generation) and context parallelism "
                                 "do not mix; generate with the gathered model")
            # ring attention: this rank's queries (B, S/cp, Hq, D) against every rank's keys,
            # the K/V shards passed around the cp group (zigzag layout, as split_sequence)
            o = context_parallel_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                           causal=True, group=self.cp_group,
                                           load_balance=True, impl=self.impl)
            return self.wo(rearrange(o, "b s h d -> b s (h d)"))
        if cache is not None:  # decoding: the new queries attend to every cached key
            k, v = cache.update(self.layer_id, k, v)  # (B, L + S, Hkv, D)
        # causal, aligned bottom-right when seqlen_q < seqlen_k (the KV-cache case)
        o = flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                            impl=self.impl)  # (B, S, Hq, D)
        return self.wo(rearrange(o, "b s h d -> b s (h d)"))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise: (..., f) x (..., f) -> (..., f)."""
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(x W_gate^T) * (x W_up^T)), gate and up as one merged weight."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.w_gate_up = nn.Linear(d, 2 * f, bias=False)
        self.w_down = nn.Linear(f, d, bias=False)
        self.impl = "reference"  # "reference": the plain GEMM then silu * up
        self.activation = swiglu  # selective recomputation checkpoints it (recompute.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d) (under SP both (B, S/tp, d))."""
        if self.impl == "reference":
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)  # (B, S, f[/tp]) each
            return self.w_down(self.activation(gate, up))
        # fused: one GEMM with the SwiGLU in its epilogue. Under TP it reads the layer's input
        # region itself (the SP all-gather, or Megatron's f) and this rank's [gate; up] rows.
        region = getattr(self.w_gate_up, "input_region", None)
        x = region(x) if region is not None else x
        return self.w_down(linear_swiglu(x, self.w_gate_up.weight, impl=self.impl))


class Block(nn.Module):
    """Pre-norm decoder block, written with the residual carried beside the stream so that a
    fused norm can add it in its own pass: (h, r) -> norm(h + r) -> attention -> ... ."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, impl="reference")
        self.attn = Attention(cfg, layer_id)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, impl="reference")
        self.mlp = MLP(cfg)

    def forward(self, h, residual, cos, sin, cache=None):
        """h, residual (B, S, d) (residual None on a chunk's first block) -> (h', residual').
        The block's output stream is h' + residual' (x + attn(norm x) + mlp(norm .))."""
        if residual is None:
            residual, x = h, self.attn_norm(h)
        else:
            x, residual = self.attn_norm(h, residual)  # norm(h + r), h + r
        h = self.attn(x, cos, sin, cache)
        x, residual = self.mlp_norm(h, residual)
        return self.mlp(x), residual


def sample_next(logits: torch.Tensor, temperature: float, top_k: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B, 1): greedy at temperature 0, else top-k sampling."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


class DeepSeekLM(nn.Module):
    """The decoder: `forward(tokens (B, S))` -> logits (B, S, V), or with targets the mean loss.

    Args:
        cfg: the model shape.
        seed: seed of the initialisation (None: one drawn from torch's global generator).
        lazy: leave every parameter on the meta device (no memory); `materialize_` or
            `parallelize` gives them values later.

    A pipeline chunk (`stage`) may lack the embedding (its input is then the residual stream
    (B, S_local, d)) or the head (it then returns the stream).
    """

    def __init__(self, cfg: ModelConfig, *, seed: int | None = None, lazy: bool = False):
        super().__init__()
        self.cfg = cfg
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        with torch.device("meta"):  # the structure only: no memory, no random numbers drawn
            # `_weight` skips Embedding's normal_() init, which on the meta device runs through
            # torch's Python decompositions (~20 s of imports per process); init_value gives
            # every parameter its value anyway
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size)))
            # a ModuleDict keyed by the layer index: a chunk keeps the names of its layers
            self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
            self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, impl="reference")
            self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cross_entropy = cross_entropy_reference  # (N, V) logits, (N,) targets -> mean
        self.seq_shards = 1  # the stream between blocks is (B, S / seq_shards, d) (SP: tp)
        # context parallelism (parallelize, step 3): the cp group and its size; the tokens and
        # the stream are then this rank's zigzag shard, (B, S/cp) and (B, S/cp[/tp], d)
        self.cp_group, self.cp = None, 1
        if not lazy:
            self.materialize_()

    # ---------------------------------------------------------------- parameters
    def materialize_(self, value=None, *, dtype=torch.float32, device="cpu") -> list[str]:
        """Give every meta parameter a value: ``value(name, param)`` (default: the seeded
        init, `init_value`) cast to `dtype` on `device`. Attributes set on the meta parameter
        (sequence-parallel marks) are kept. Returns the names materialised."""
        if value is None:
            specs = param_specs(self.cfg)

            def value(name, p):
                return init_value(self.cfg, self.seed, name, specs[name])
        done = []
        for name, p in list(self.named_parameters()):
            if not p.is_meta:
                continue
            path, _, attr = name.rpartition(".")
            owner = self.get_submodule(path)
            t = value(name, p)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{name}: value of shape {tuple(t.shape)}, the parameter is "
                                 f"{tuple(p.shape)}")
            new = nn.Parameter(t.detach().to(device=device, dtype=dtype).contiguous(),
                               requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)
            owner._parameters[attr] = new
            del t, new  # before the next value is drawn: one full tensor at a time
            done.append(name)
        return done

    def stage(self, layer_ids, *, first: bool, last: bool) -> DeepSeekLM:
        """A chunk of this model sharing its modules: layers `layer_ids`, the embedding when
        `first`, the final norm and head when `last` (no copy; names are kept)."""
        c = DeepSeekLM.__new__(DeepSeekLM)
        nn.Module.__init__(c)
        c.cfg, c.seed = self.cfg, self.seed
        c.cross_entropy, c.seq_shards = self.cross_entropy, self.seq_shards
        c.cp_group, c.cp = self.cp_group, self.cp
        c.embed = self.embed if first else None
        c.layers = nn.ModuleDict({str(i): self.layers[str(i)] for i in layer_ids})
        c.norm, c.head = (self.norm, self.head) if last else (None, None)
        return c

    @property
    def first(self) -> bool:
        return self.embed is not None

    @property
    def last(self) -> bool:
        return self.head is not None

    def positions(self, seq: int, device=None, *, start: int = 0) -> torch.Tensor:
        """Positions (seq,) int64 of this rank's `seq` tokens in the whole sequence:
        [start, start + seq), or under context parallelism this rank's share of
        arange(seq * cp) as `split_sequence` lays it out (zigzag: chunks r and 2cp-1-r of
        2cp, so with cp = 2 and S = 8 rank 0 holds positions [0, 1, 6, 7]). Computed with the
        layout function itself, never assumed contiguous: RoPE must rotate each token by its
        true position for the ranks to compute the single-device model."""
        if self.cp == 1:
            return torch.arange(start, start + seq, device=device)
        if start:
            raise ValueError("DeepSeekLM.positions: context parallelism starts at position 0")
        whole = torch.arange(seq * self.cp, device=device)
        return split_sequence(whole, dim=0, group=self.cp_group, load_balance=True)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None):
        """x: tokens (B, S) int64 (or, without the embedding, the stream (B, S_local, d)).
        Under context parallelism S is this rank's S/cp tokens (`split_sequence` of the whole
        sequence), targets likewise, and the loss is the mean over these local tokens.

        Returns the stream (B, S_local, d) when this chunk has no head, else the logits
        (B, S, V) (V/tp under TP), or with `targets` (B, S) the mean cross-entropy (fp32).
        With a `cache` (generation) x continues the cached positions.
        """
        if self.embed is not None:
            seq = x.shape[1]
            h = self.embed(x)  # (B, S[/tp], d)
        else:
            seq, h = x.shape[1] * self.seq_shards, x
        start = cache.length if cache is not None else 0
        pos = self.positions(seq, h.device, start=start)  # (S_here,): zigzag under CP
        cos, sin = rope_cache(seq, self.cfg.head_dim, self.cfg.rope_theta, h.device,
                              positions=pos)
        residual = None
        for layer in self.layers.values():
            h, residual = layer(h, residual, cos, sin, cache)
        if residual is not None:
            h = h + residual  # the residual stream: what the next chunk (or the head) reads
        if cache is not None:
            cache.length += seq
        if self.head is None:
            return h
        logits = self.head(self.norm(h))  # (B, S, V[/tp]); under SP the head gathers S
        if targets is None:
            return logits
        return self.loss(logits, targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits (B, S, V[/tp]) against targets (B, S), in fp32 (the
        plain one, the in-place one, or the vocab-parallel one: `parallelize` chooses); the
        plain one in fp64 for an fp64 model (`.double()`, for checking against the maths)."""
        kw = {"dtype": torch.float64} if (logits.dtype == torch.float64 and
                                          self.cross_entropy is cross_entropy_reference) else {}
        return self.cross_entropy(logits.flatten(0, 1), targets.flatten(), **kw)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int = 20, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Continue `tokens` (B, S) by `max_new_tokens` -> (B, S + new).

        With the KV cache (default) the prompt goes through once (prefill), then every new
        token costs one position per layer (decode: `flash_attention` with seqlen_q = 1 <
        seqlen_k, bottom-right causal). When the context reaches `seq_len` the cache is
        rebuilt from the last `seq_len // 2` tokens (a sliding window). `use_cache=False` is
        the teaching version: the whole window again for every token (O(S^2) per step).
        """
        window = self.cfg.seq_len
        p = next(self.parameters())
        result, ctx = [tokens], tokens[:, -window:]
        cache = KVCache(self.cfg, tokens.shape[0], window, p.dtype, p.device) if use_cache \
            else None
        logits = self(ctx, cache=cache)[:, -1]  # prefill
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            result.append(nxt)
            ctx = torch.cat([ctx, nxt], dim=1)
            if cache is None:
                ctx = ctx[:, -window:]
                logits = self(ctx)[:, -1]
            elif cache.length == window:  # full: slide, re-prefill the last half
                ctx = ctx[:, -(window // 2):]
                cache = KVCache(self.cfg, tokens.shape[0], window, p.dtype, p.device)
                logits = self(ctx, cache=cache)[:, -1]
            else:
                logits = self(nxt, cache=cache)[:, -1]
        return torch.cat(result, dim=1)
