"""`haillm-plan`: per-rank memory and step FLOPs of a run's `Config`, before running it.

Everything is read from one `Config` (no layout type of its own): the degrees and switches
from `cfg.parallel`, the micro-batch size `cfg.micro_batch_size`, the sequence length
`cfg.model.seq_len`, the precision `cfg.train.precision`, the device `cfg.run.device` (the
fused Triton kernels run on CUDA only; on the CPU every "fused" op runs its package's PyTorch
reference, and the planner counts what really runs). `haillm-plan` builds that `Config` from
its flags (`plan_config`).

Model states (Ψ = parameters held by the rank: its pipeline stage's layers, divided over TP;
the norm weights are replicated over TP):

* parameters: Ψ × bytes of the training precision (bf16: 2);
* gradients: 4Ψ (fp32 *main* gradients: the micro-batches accumulate into fp32 buckets, as
  DeepSeek section 2.4 and the ZeRO package do; ZeRO-1 keeps them whole on every DP rank);
* optimizer: 12Ψ / N_d with ZeRO-1 (fp32 master copy + Adam m and v, sharded over the N_d
  DP ranks; Rajbhandari et al. 2020, eq. for stage 1), 12Ψ without; 8Ψ / N_d (8Ψ) in fp32,
  where the parameters are their own master weights.

Activations (Korthikanti et al. 2022, "Reducing activation recomputation", section 4): the
bytes each block *saves for backward* per micro-batch, counted tensor by tensor for
`DeepSeekLM` (pre-norm RMSNorm, RoPE, merged QKV with GQA, SwiGLU) as it runs. With s sequence
length, b micro-batch size, h hidden, f FFN width, a heads, k = KV width (n_kv_heads x
head_dim), t = TP degree, n = t under SP (else 1), p = bytes per activation:

    norm, PyTorch (x2):  (8 s b h + 4 s b) / n     fp32 input and normalised copy, rstd
    norm, fused (x2):    (p s b h + 8 s b) / n     the kernel keeps h = x + r, mean, rstd
    QKV, gate-up input:  s b h p / n (each)        the norm output; under SP the column-
                                                   parallel layer keeps its shard and
                                                   re-gathers it in backward (the fused
                                                   SwiGLU keeps the gathered s b h p)
    attention, flash:    (2 s b h + 2 s b k) p / t + 4 a s b / t    q, k, v, O (= the Wo
                                                   input), logsumexp
    attention, plain:    the same without the LSE + 8 a s^2 b / t + s^2 + s   the fp32
                                                   probabilities (twice: softmax out and the
                                                   PV einsum's copy), the causal mask
    SwiGLU:              PyTorch 4 s b f p / t (gate|up, silu, product); kernel s b f p / t

The paper's GPT (with dropout, GELU, materialised attention) gives s b h (34 + 5 a s / h) / t
bytes per layer in 16-bit with SP; `korthikanti_bytes` prints it next to ours.

Recomputation (`parallel.recompute`, `haillm.trainer.recompute`) changes what a block keeps:

* ``full``: the block's inputs only, the stream and the residual: 2 s b h p / n (the
  chunk's first block: one); in backward one block at a time recomputes its forward, so a
  stage also needs one block's ``none`` activations transiently (Korthikanti section 5,
  Chen et al. 2016's sqrt(n) argument with one segment per block);
* ``selective``: the PyTorch norms keep only their input h (s b h p / n instead of
  (8 s b h + 4 s b) / n), the PyTorch SwiGLU drops the silu output (3 s b f p / t); the
  attention core is FlashAttention's own recomputation (Korthikanti's selective), so the
  plain attention keeps its probabilities; the fused kernels keep nothing more to drop;
* ``recompute_layers = N``: only the first N blocks of each chunk recompute.

Context parallelism (``cp``, ring attention; `apply_context_parallel`): every rank holds
s/cp tokens of every sequence (the zigzag chunks), so every per-token term above is taken at
s/cp (the token ids, RoPE's cos and sin of the rank's positions, the loss). Attention is then
`context_parallel_attention` whatever the impl: its autograd function saves this rank's q, k,
v, O and the fp32 logsumexp only (the block scores are recomputed in backward, even with
``reference`` blocks), so under CP the flash line holds at s/cp and the plain one does not
apply. The ring's transient buffers are not saved tensors; one attention at a time holds them,
so the plan adds them once per rank as the **ring workspace** (`ring_workspace`), with
kv = 2 b (s/cp) k / t the elements of one K/V shard::

    forward:   2 kv p                  the block being computed on + the one in flight
    backward:  2 kv p + 2 kv 4         the same two K/V blocks + two fp32 dK/dV accumulators
               (+ 4 b (s/cp) h / t      (the one being sent on, the one arriving)
                below fp32)            the fp32 dQ accumulator (in fp32 it is dQ itself)

The workspace is the larger, the backward. Model states under CP: the parameters are
replicated over dp x cp, and ZeRO-1 shards the optimizer over that group (N_d = dp cp);
the world is dp cp tp pp.

Under the 1F1B schedule, pipeline stage i holds min(pp - i, M) micro-batches in flight
(Narayanan et al. 2021): stage 0 is the worst, which is what the table shows first.

FLOPs per step: (6 N + 12 L h s) x tokens (`metrics.flops_per_token`; divided by the world
dp cp tp pp per rank), plus what the
recomputation repeats: full, one more forward of the blocks (2 N_blocks + 4 L h s per token:
8N instead of 6N); selective, the norms and the SwiGLU activation (~ 8 h + 5 f per token and
layer).
What the real planners (Megatron's `--log-memory`, DeepSpeed's estimators) add: the
allocator's fragmentation, NCCL buffers and temporary buffers; we count saved tensors only.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from haillm.trainer.config import PRESETS, Config, ConfigError, check_sequence, load_config
from haillm.trainer.metrics import flops_per_token
from haillm.trainer.parallelize import split_layers

__all__ = ["Plan", "activation_bytes", "block_bytes", "korthikanti_bytes", "local_tokens", "plan",
           "plan_config", "plan_table", "recompute_flops_per_token", "recompute_workspace",
           "ring_workspace", "state_bytes"]

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Plan:
    """Per-rank bytes of one pipeline stage (see the module docstring for the formulas).

    `activations` = `in_flight` x the saved bytes of one micro-batch + `recompute_workspace`
    (one block's activations, rebuilt in backward; 0 without full recomputation) +
    `ring_workspace` (the ring's K/V and dK/dV buffers of one attention; 0 at cp = 1).
    """

    stage: int
    n_params: int
    params: float
    grads: float
    optimizer: float
    activations: float
    in_flight: int
    flops_per_step: float
    flops_per_rank: float
    activations_per_microbatch: float = 0.0
    recompute_workspace: float = 0.0
    ring_workspace: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def _stage_params(cfg: Config, stage: int) -> int:
    """Parameters held by one rank of pipeline stage `stage` (TP shards + replicated norms)."""
    m, t, pp = cfg.model, cfg.parallel.tp, cfg.parallel.pp
    d, f, v = m.hidden_size, m.intermediate_size, m.vocab_size
    kv = m.n_kv_heads * m.head_dim
    sharded = d * (d + 2 * kv) + d * d + 3 * d * f  # QKV, Wo, gate/up/down
    n = len(split_layers(m.n_layers, pp)[stage])
    total = n * (sharded // t + 2 * d)
    if stage == 0:
        total += v * d // t
    if stage == pp - 1:
        total += v * d // t + d
    return total


def _opt_bytes(cfg: Config) -> int:
    """AdamW state bytes per parameter: m, v and (below fp32) the fp32 master copy."""
    return 8 if cfg.train.precision == "fp32" else 12


def state_bytes(cfg: Config, stage: int = 0) -> dict[str, float]:
    """Parameter, fp32-main-gradient and optimizer bytes of one rank of `stage` (ZeRO-1 shards
    the optimizer over dp x cp: the CP ranks hold the same parameters, like DP replicas)."""
    psi = _stage_params(cfg, stage)
    p = cfg.parallel
    opt = _opt_bytes(cfg) * psi / (p.dp * p.cp if p.zero else 1)
    return {"n_params": psi, "params": BYTES[cfg.train.precision] * psi, "grads": 4.0 * psi,
            "optimizer": opt}


def _kernels(cfg: Config) -> tuple[bool, bool]:
    """(fused norm runs, fused SwiGLU runs): the Triton kernels, on CUDA only."""
    cuda = cfg.run.device == "cuda"
    return cfg.parallel.fused_norm and cuda, cfg.parallel.fused_swiglu and cuda


def local_tokens(cfg: Config) -> int:
    """Tokens of each sequence on one rank before SP: seq_len / cp (the zigzag chunks)."""
    return cfg.model.seq_len // cfg.parallel.cp


def block_bytes(cfg: Config, mode: str = "none", *, first_in_chunk: bool = False) -> float:
    """Bytes one decoder block saves for backward, per micro-batch, in recompute `mode`
    (under CP: at this rank's s/cp tokens)."""
    m, par = cfg.model, cfg.parallel
    s, b, h, f, a, t = (local_tokens(cfg), cfg.micro_batch_size, m.hidden_size,
                        m.intermediate_size, m.n_heads, par.tp)
    k = m.n_kv_heads * m.head_dim
    p = BYTES[cfg.train.precision]
    n = t if (par.sequence_parallel and t > 1) else 1
    sbh = s * b * h
    if mode == "full":  # the checkpoint keeps the stream and the residual (one on the first)
        return (1 if first_in_chunk else 2) * sbh * p / n
    fused_norm, fused_swiglu = _kernels(cfg)
    sel = mode == "selective"
    if fused_norm:
        norm = (p * sbh + 8 * s * b) / n
    elif sel:
        norm = p * sbh / n  # the checkpointed norm keeps its input only
    else:
        norm = (8 * sbh + 4 * s * b) / n  # fp32 input, fp32 normalised copy, rstd
    total = 2 * norm
    total += sbh * p / n  # QKV input (a sequence shard under SP: re-gathered in backward)
    # gate-up input: the fused SwiGLU (kernel or, on CPU, its reference) reads the gathered x
    total += sbh * p if par.fused_swiglu else sbh * p / n
    qkvo = (2 * sbh + 2 * s * b * k) * p / t
    # under CP the ring's autograd function saves q, k, v, O, lse for any block impl
    if par.attention == "reference" and par.cp == 1:  # probabilities (x2, fp32) and the mask
        total += qkvo + 8 * a * s * s * b / t + s * s + s
    else:
        total += qkvo + 4 * a * s * b / t  # flash: + logsumexp
    if fused_swiglu:
        total += s * b * f * p / t  # the kernel keeps x (above); Wo-down's input
    else:
        total += (3 if sel and not par.fused_swiglu else 4) * s * b * f * p / t
    return total


def _recomputed(cfg: Config, n_layers: int) -> int:
    """How many of a chunk's `n_layers` blocks recompute."""
    p = cfg.parallel
    if p.recompute == "none":
        return 0
    return min(p.recompute_layers, n_layers) if p.recompute_layers else n_layers


def activation_bytes(cfg: Config, n_layers: int, *, first: bool = True,
                     last: bool = False) -> float:
    """Bytes saved for backward by one micro-batch through `n_layers` blocks of one chunk on
    one rank, in the config's recompute mode (`parallel.recompute`, `recompute_layers`); under
    CP every term at the rank's s/cp tokens."""
    m, par = cfg.model, cfg.parallel
    s, b, t = local_tokens(cfg), cfg.micro_batch_size, par.tp
    p = BYTES[cfg.train.precision]
    n = t if (par.sequence_parallel and t > 1) else 1
    r = _recomputed(cfg, n_layers)
    total = 0.0
    for i in range(n_layers):
        mode = par.recompute if i < r else "none"
        total += block_bytes(cfg, mode, first_in_chunk=i == 0)
    if n_layers:  # RoPE's cos and sin (S, head_dim) fp32, shared by the chunk's blocks
        total += 2 * 4 * s * m.head_dim
    if first:
        total += 8 * s * b  # the token ids
    if last:
        fused_norm, _ = _kernels(cfg)
        sbh = s * b * m.hidden_size
        total += (p * sbh + 8 * s * b) / n if fused_norm else (8 * sbh + 4 * s * b) / n
        total += sbh * p / n  # the head's input
        if t > 1:  # vocab-parallel: fp32 exp of the local logits, targets, masks
            total += 4 * s * b * m.vocab_size / t + 10 * s * b
        elif par.fused_cross_entropy:  # in place: the logits, in their own dtype
            total += p * s * b * m.vocab_size
        else:
            total += 4 * s * b * m.vocab_size  # fp32 log-probabilities
    return total


def recompute_workspace(cfg: Config, n_layers: int) -> float:
    """Bytes rebuilt transiently in backward: one block's `none` activations under full
    recomputation (its recomputed forward lives until that block's backward ends), else 0."""
    if cfg.parallel.recompute != "full" or not _recomputed(cfg, n_layers):
        return 0.0
    return block_bytes(cfg, "none")


def ring_workspace(cfg: Config) -> float:
    """Bytes of the ring's transient buffers during one attention's backward (the larger of
    its two passes), 0 at cp = 1: two K/V shards (the one computed on, the one in flight),
    2 x 2 b (s/cp) k / t elements in the training precision; two fp32 dK/dV accumulators of
    the same shape (the one being sent on, the one arriving); below fp32 the fp32 dQ
    accumulator, b (s/cp) h / t (in fp32 it is the returned dQ). The forward holds only the
    two K/V shards."""
    m, par = cfg.model, cfg.parallel
    if par.cp == 1:
        return 0.0
    s, b, t = local_tokens(cfg), cfg.micro_batch_size, par.tp
    p = BYTES[cfg.train.precision]
    kv = 2 * b * s * m.n_kv_heads * m.head_dim / t  # one (2, b, s/cp, h_kv/t, d) K/V shard
    dq = 4 * b * s * m.hidden_size / t if p < 4 else 0
    return 2 * kv * p + 2 * kv * 4 + dq


def recompute_flops_per_token(cfg: Config) -> float:
    """Extra forward FLOPs per token that the recomputation repeats in backward."""
    from haillm.trainer.recompute import recomputed_layers

    m, par = cfg.model, cfg.parallel
    stages = par.pp * (par.chunks if par.pipeline_schedule == "interleaved" else 1)
    r = len(recomputed_layers(m.n_layers, stages, par))  # blocks recomputed, whole model
    if r == 0:
        return 0.0
    h, f, s = m.hidden_size, m.intermediate_size, m.seq_len
    if par.recompute == "full":  # one more forward of the blocks: 2 N_block + 4 h s
        per_block = (m.n_params(embedding=False) - m.vocab_size * h - h) / m.n_layers
        return r * (2 * per_block + 4 * h * s)
    return r * (8 * h + 5 * f)  # two RMSNorms (~4 h each) and silu(gate) * up (~5 f)


def korthikanti_bytes(cfg: Config) -> float:
    """Korthikanti et al.'s per-layer activation bytes of a GPT layer (16-bit).

    Without SP: s b h (10 + 24/t + 5 a s / (h t)); with SP: s b h / t (34 + 5 a s / h);
    selective recomputation drops the 5 a s / h term; full keeps 2 s b h (the layer input).
    Under CP every term divides by cp: each rank holds s/cp rows of every activation, the
    score matrix included ((s/cp) x s per head: its queries against every key).
    """
    m, par = cfg.model, cfg.parallel
    s, b, h, a, t = m.seq_len, cfg.micro_batch_size, m.hidden_size, m.n_heads, par.tp
    return _korthikanti(s, b, h, a, t, par) / par.cp


def _korthikanti(s, b, h, a, t, par) -> float:
    sp = par.sequence_parallel and t > 1
    attn = 0.0 if par.recompute == "selective" else 5 * a * s / h
    if par.recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    if sp:
        return s * b * h / t * (34 + attn)
    return s * b * h * (10 + 24 / t + attn / t)


def _check(cfg: Config) -> None:
    m, par = cfg.model, cfg.parallel
    for name, n, k in (("n_heads", m.n_heads, par.tp), ("n_kv_heads", m.n_kv_heads, par.tp),
                       ("vocab_size", m.vocab_size, par.tp),
                       ("intermediate_size", m.intermediate_size, par.tp)):
        if n % k:
            raise ConfigError(f"{name} ({n}) must be divisible by tp ({k})")
    check_sequence(cfg)  # Config.validate's seq_len rules (SP, CP's zigzag), in its order
    if m.n_layers < par.pp:
        raise ConfigError(f"n_layers ({m.n_layers}) must be >= pp ({par.pp})")


def plan(cfg: Config) -> list[Plan]:
    """One `Plan` per pipeline stage. Raises `ConfigError` for a layout the model can't take."""
    _check(cfg)
    m, par = cfg.model, cfg.parallel
    s = m.seq_len
    gb = par.dp * par.microbatches * cfg.micro_batch_size
    step_flops = (flops_per_token(m, s) + recompute_flops_per_token(cfg)) * gb * s
    world = par.dp * par.cp * par.tp * par.pp
    out = []
    for i, layers in enumerate(split_layers(m.n_layers, par.pp)):
        st = state_bytes(cfg, i)
        in_flight = min(par.pp - i, par.microbatches)  # 1F1B warm-up depth of stage i
        per_mb = activation_bytes(cfg, len(layers), first=i == 0, last=i == par.pp - 1)
        ws = recompute_workspace(cfg, len(layers))
        ring = ring_workspace(cfg) if layers else 0.0
        out.append(Plan(i, st["n_params"], st["params"], st["grads"], st["optimizer"],
                        in_flight * per_mb + ws + ring, in_flight, step_flops,
                        step_flops / world, per_mb, ws, ring))
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f}"


def plan_table(cfg: Config, title: str = "") -> str:
    """A text table: one row per component, one column per (first, last) pipeline stage."""
    plans = plan(cfg)
    par = cfg.parallel
    cols = [plans[0]] + ([plans[-1]] if len(plans) > 1 else [])
    names = [f"stage {p.stage}" for p in cols]
    rows = [("parameters (M)", [f"{p.n_params / 1e6:,.1f}" for p in cols]),
            (f"params ({cfg.train.precision}) GiB", [_gib(p.params) for p in cols]),
            ("fp32 main grads GiB", [_gib(p.grads) for p in cols]),
            (f"optimizer ({_opt_bytes(cfg)}Ψ{'/N_d' if par.zero else ''}) GiB",
             [_gib(p.optimizer) for p in cols]),
            ("micro-batches in flight", [str(p.in_flight) for p in cols]),
            ("activations/micro-batch GiB", [_gib(p.activations_per_microbatch) for p in cols])]
    if any(p.recompute_workspace for p in cols):
        rows.append(("recompute workspace GiB", [_gib(p.recompute_workspace) for p in cols]))
    if any(p.ring_workspace for p in cols):
        rows.append(("ring workspace GiB", [_gib(p.ring_workspace) for p in cols]))
    rows += [("activations GiB", [_gib(p.activations) for p in cols]),
             ("total GiB", [_gib(p.total) for p in cols])]
    w = max(len(r[0]) for r in rows)
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'':<{w}}  " + "  ".join(f"{n:>10}" for n in names))
    for name, vals in rows:
        lines.append(f"{name:<{w}}  " + "  ".join(f"{v:>10}" for v in vals))
    p0 = plans[0]
    k = korthikanti_bytes(cfg)
    extra = recompute_flops_per_token(cfg) / flops_per_token(cfg.model)
    rec = f" (recompute {par.recompute}: +{100 * extra:.0f} %)" if par.recompute != "none" else ""
    lines.append(f"step: {p0.flops_per_step:.3e} FLOPs{rec} ({p0.flops_per_rank:.3e} per rank); "
                 f"Korthikanti GPT layer (16-bit, materialised attention, recompute "
                 f"{par.recompute}): {k / 2**20:,.1f} "
                 f"MiB per layer per micro-batch")
    return "\n".join(lines)


def plan_config(preset: str = "tiny", *, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1,
                microbatches: int = 4, micro_batch_size: int = 1, seq_len: int | None = None,
                precision: str = "bf16", sequence_parallel: bool = True, zero: bool = True,
                attention: str = "flash", recompute: str = "none", recompute_layers: int = 0,
                **parallel) -> Config:
    """The `Config` that `haillm-plan`'s flags describe: the preset with these degrees and
    switches, `train.global_batch` = dp x microbatches x micro_batch_size (the cp ranks of a
    sequence share it: the batch does not grow with cp). `attention`:
    ``flash`` (the preset's impl) or ``plain`` (``reference``: the score matrix saved);
    other `parallel` keys by name."""
    cfg = load_config(preset)
    for name, v in (("dp", dp), ("tp", tp), ("pp", pp), ("cp", cp), ("microbatches", microbatches),
                    ("micro_batch_size", micro_batch_size)):
        if v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {seq_len}")
    if attention not in ("flash", "plain"):
        raise ConfigError(f"--attention must be flash or plain, got {attention!r}")
    cfg.parallel = dataclasses.replace(
        cfg.parallel, dp=dp, tp=tp, pp=pp, cp=cp, microbatches=microbatches,
        sequence_parallel=sequence_parallel, zero=zero, recompute=recompute,
        recompute_layers=recompute_layers,
        attention="reference" if attention == "plain" else cfg.parallel.attention, **parallel)
    cfg.train.global_batch = dp * microbatches * micro_batch_size
    cfg.train.precision = precision
    if seq_len is not None:
        cfg.model.seq_len = seq_len
    cfg.validate_ranges()
    return cfg


def plan_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="haillm-plan", description="Per-rank memory (parameters, "
                                 "fp32 main grads, ZeRO-1 optimizer states, activations) and "
                                 "step FLOPs of a preset in a layout.")
    ap.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1,
                    help="context-parallel degree (ring attention over cp ranks per sequence)")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--precision", choices=list(BYTES), default="bf16")
    ap.add_argument("--no-sp", action="store_true", help="sequence parallelism off")
    ap.add_argument("--no-zero", action="store_true", help="replicate the optimizer states")
    ap.add_argument("--attention", choices=["flash", "plain"], default="flash")
    # checked by the config (one error line, exit 2), not by argparse's choices
    ap.add_argument("--recompute", default="none", metavar="none|selective|full",
                    help="activation recomputation (parallel.recompute)")
    ap.add_argument("--recompute-layers", type=int, default=0, metavar="N",
                    help="only the first N blocks of each chunk recompute (0: all)")
    return ap


def run_plan(argv: list[str] | None = None) -> str:
    """Parse `haillm-plan` arguments and return the table (raises `ConfigError`)."""
    a = plan_parser().parse_args(argv)
    cfg = plan_config(a.preset, dp=a.dp, tp=a.tp, pp=a.pp, cp=a.cp, microbatches=a.microbatches,
                      micro_batch_size=a.micro_batch_size, seq_len=a.seq_len,
                      precision=a.precision, sequence_parallel=not a.no_sp,
                      zero=not a.no_zero, attention=a.attention, recompute=a.recompute,
                      recompute_layers=a.recompute_layers)
    m = cfg.model
    rec = "" if a.recompute == "none" else (
        f", recompute {a.recompute}"
        + (f" (first {a.recompute_layers} blocks per chunk)" if a.recompute_layers else ""))
    cps = f" cp={a.cp}" if a.cp > 1 else ""
    title = (f"haillm-plan: {a.preset} ({m.n_params() / 1e9:.2f}B params), dp={a.dp}{cps} "
             f"tp={a.tp} pp={a.pp}, {a.microbatches} x {a.micro_batch_size} x "
             f"{m.seq_len} tokens per DP rank, {a.precision}, "
             f"SP {'off' if a.no_sp else 'on'}, ZeRO-1 {'off' if a.no_zero else 'on'}{rec}")
    return plan_table(cfg, title=title)
