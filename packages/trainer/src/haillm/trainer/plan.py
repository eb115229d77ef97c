"""`haillm-plan`: per-rank memory and step FLOPs of a preset in a given layout, before running it.

Model states (Ψ = parameters held by the rank: its pipeline stage's layers, divided over TP;
the norm weights are replicated over TP):

* parameters: Ψ × bytes of the training precision (bf16: 2);
* gradients: 4Ψ (fp32 *main* gradients: the micro-batches accumulate into fp32 buckets, as
  DeepSeek section 2.4 and the ZeRO package do; ZeRO-1 keeps them whole on every DP rank);
* optimizer: 12Ψ / N_d with ZeRO-1 (fp32 master copy + Adam m and v, sharded over the N_d
  DP ranks; Rajbhandari et al. 2020, eq. for stage 1), 12Ψ without; 8Ψ / N_d (8Ψ) in fp32,
  where the parameters are their own master weights.

Activations (Korthikanti et al. 2022, "Reducing activation recomputation", section 4): the
bytes each layer *saves for backward* per micro-batch, counted tensor by tensor for this
model (pre-norm, RMSNorm, RoPE, merged QKV with GQA, SwiGLU). With s sequence length, b
micro-batch size, h hidden, f FFN width, a heads, t = TP degree, p = bytes per activation:

    norms (x2):      (3 s b h p + 4 s b) / (t if SP else 1)     input, saved copy, rstd
    linear inputs:   2 s b h p                                  QKV and gate-up read the
                                                                gathered (B, S, d) input
    attention flash: (2 s b h + 2 s b k) p / t + 4 a s b / t   q, O (= the Wo input), k and
                                                                v at the KV width k, logsumexp
    attention plain: 4 s b h p / t + 4 a s^2 b / t + s^2       q, k, v expanded to all heads,
                                                                Wo input, fp32 probabilities,
                                                                the causal mask
    SwiGLU MLP:      plain: 4 s b f p / t (gate|up, silu, product); fused: 2 s b f p / t

The paper's GPT (with dropout, GELU, materialised attention) gives s b h (34 + 5 a s / h)
bytes per layer in 16-bit without TP; `korthikanti_bytes` prints it next to ours.
Under the 1F1B schedule, pipeline stage i holds min(pp - i, M) micro-batches in flight
(Narayanan et al. 2021): stage 0 is the worst, which is what the table shows first.

FLOPs per step: (6 N + 12 L h s) x tokens (`metrics.flops_per_token`), per rank / world.
What the real planners (Megatron's `--log-memory`, DeepSpeed's estimators) add: the
allocator's fragmentation, NCCL buffers and temporary buffers; we count saved tensors only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from haillm.trainer.config import PRESETS, ConfigError, ModelConfig, load_config
from haillm.trainer.metrics import flops_per_token
from haillm.trainer.parallelize import split_layers

__all__ = ["Layout", "Plan", "activation_bytes", "korthikanti_bytes", "plan", "plan_table",
           "state_bytes"]

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Layout:
    """One way to run the model: the parallel degrees and the step's shape."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    microbatches: int = 4
    micro_batch_size: int = 1
    seq_len: int | None = None
    precision: str = "bf16"
    sequence_parallel: bool = True
    zero: bool = True
    attention: str = "flash"
    """`flash` (output + logsumexp saved) or `plain` (the score matrix saved)."""
    fused_swiglu: bool = True


@dataclass
class Plan:
    """Per-rank bytes of one pipeline stage (see the module docstring for the formulas)."""

    stage: int
    n_params: int
    params: float
    grads: float
    optimizer: float
    activations: float
    in_flight: int
    flops_per_step: float
    flops_per_rank: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def _stage_params(m: ModelConfig, lay: Layout, stage: int) -> int:
    """Parameters held by one rank of pipeline stage `stage` (TP shards + replicated norms)."""
    d, f, v, t = m.hidden_size, m.intermediate_size, m.vocab_size, lay.tp
    kv = m.n_kv_heads * m.head_dim
    sharded = d * (d + 2 * kv) + d * d + 3 * d * f  # QKV, Wo, gate/up/down
    n = len(split_layers(m.n_layers, lay.pp)[stage])
    total = n * (sharded // t + 2 * d)
    if stage == 0:
        total += v * d // t
    if stage == lay.pp - 1:
        total += v * d // t + d
    return total


def _opt_bytes(lay: Layout) -> int:
    """AdamW state bytes per parameter: m, v and (below fp32) the fp32 master copy."""
    return 8 if lay.precision == "fp32" else 12


def state_bytes(m: ModelConfig, lay: Layout, stage: int = 0) -> dict[str, float]:
    """Parameter, fp32-main-gradient and optimizer bytes of one rank of `stage`."""
    psi = _stage_params(m, lay, stage)
    opt = _opt_bytes(lay) * psi / (lay.dp if lay.zero else 1)
    return {"n_params": psi, "params": BYTES[lay.precision] * psi, "grads": 4.0 * psi,
            "optimizer": opt}


def activation_bytes(m: ModelConfig, lay: Layout, n_layers: int, *, first: bool = True,
                     last: bool = False) -> float:
    """Bytes saved for backward by one micro-batch through `n_layers` layers of one rank."""
    s = lay.seq_len or m.seq_len
    b, h, f, a, t = lay.micro_batch_size, m.hidden_size, m.intermediate_size, m.n_heads, lay.tp
    p = BYTES[lay.precision]
    sbh = s * b * h
    norm_div = t if (lay.sequence_parallel and t > 1) else 1
    per_layer = 2 * (3 * sbh * p + 4 * s * b) / norm_div  # two RMSNorms
    per_layer += 2 * sbh * p  # QKV and gate-up inputs (gathered under SP)
    kv = m.n_kv_heads * m.head_dim
    if lay.attention == "flash":  # q, k and v at their own (GQA) widths, O (= the Wo input), LSE
        per_layer += (2 * sbh + 2 * s * b * kv) * p / t + 4 * a * s * b / t
    else:  # q, k, v expanded to all heads, the Wo input, fp32 probabilities and the mask
        per_layer += 4 * sbh * p / t + 4 * a * s * s * b / t + s * s
    per_layer += (2 if lay.fused_swiglu else 4) * s * b * f * p / t
    total = n_layers * per_layer
    if first:
        total += 8 * s * b  # the token ids
    if last:
        total += 4 * s * b * m.vocab_size / t  # fp32 logits kept by the cross-entropy
    return total


def korthikanti_bytes(m: ModelConfig, lay: Layout) -> float:
    """Korthikanti et al.'s per-layer activation bytes of a GPT layer (16-bit, no recompute).

    Without SP: s b h (10 + 24/t + 5 a s / (h t)); with SP: s b h / t (34 + 5 a s / h).
    """
    s = lay.seq_len or m.seq_len
    b, h, a, t = lay.micro_batch_size, m.hidden_size, m.n_heads, lay.tp
    if lay.sequence_parallel and t > 1:
        return s * b * h / t * (34 + 5 * a * s / h)
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def plan(m: ModelConfig, lay: Layout, global_batch: int | None = None) -> list[Plan]:
    """One `Plan` per pipeline stage. Raises `ConfigError` for a layout the model can't take."""
    for name, n, k in (("n_heads", m.n_heads, lay.tp), ("n_kv_heads", m.n_kv_heads, lay.tp),
                       ("vocab_size", m.vocab_size, lay.tp),
                       ("intermediate_size", m.intermediate_size, lay.tp)):
        if n % k:
            raise ConfigError(f"{name} ({n}) must be divisible by tp ({k})")
    if m.n_layers < lay.pp:
        raise ConfigError(f"n_layers ({m.n_layers}) must be >= pp ({lay.pp})")
    s = lay.seq_len or m.seq_len
    if lay.sequence_parallel and lay.tp > 1 and s % lay.tp:
        raise ConfigError(f"seq_len ({s}) must be divisible by tp ({lay.tp}) with SP")
    gb = global_batch or lay.dp * lay.microbatches * lay.micro_batch_size
    step_flops = flops_per_token(m, s) * gb * s
    world = lay.dp * lay.tp * lay.pp
    out = []
    for i, layers in enumerate(split_layers(m.n_layers, lay.pp)):
        st = state_bytes(m, lay, i)
        in_flight = min(lay.pp - i, lay.microbatches)  # 1F1B warm-up depth of stage i
        act = in_flight * activation_bytes(m, lay, len(layers), first=i == 0,
                                           last=i == lay.pp - 1)
        out.append(Plan(i, st["n_params"], st["params"], st["grads"], st["optimizer"], act,
                        in_flight, step_flops, step_flops / world))
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f}"


def plan_table(m: ModelConfig, lay: Layout, global_batch: int | None = None,
               title: str = "") -> str:
    """A text table: one row per component, one column per (first, last) pipeline stage."""
    plans = plan(m, lay, global_batch)
    cols = [plans[0]] + ([plans[-1]] if len(plans) > 1 else [])
    names = [f"stage {p.stage}" for p in cols]
    rows = [("parameters (M)", [f"{p.n_params / 1e6:,.1f}" for p in cols]),
            (f"params ({lay.precision}) GiB", [_gib(p.params) for p in cols]),
            ("fp32 main grads GiB", [_gib(p.grads) for p in cols]),
            (f"optimizer ({_opt_bytes(lay)}Ψ{'/N_d' if lay.zero else ''}) GiB",
             [_gib(p.optimizer) for p in cols]),
            ("micro-batches in flight", [str(p.in_flight) for p in cols]),
            ("activations GiB", [_gib(p.activations) for p in cols]),
            ("total GiB", [_gib(p.total) for p in cols])]
    w = max(len(r[0]) for r in rows)
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'':<{w}}  " + "  ".join(f"{n:>10}" for n in names))
    for name, vals in rows:
        lines.append(f"{name:<{w}}  " + "  ".join(f"{v:>10}" for v in vals))
    p0 = plans[0]
    k = korthikanti_bytes(m, lay)
    lines.append(f"step: {p0.flops_per_step:.3e} FLOPs ({p0.flops_per_rank:.3e} per rank); "
                 f"Korthikanti GPT layer (16-bit, materialised attention): {k / 2**20:,.1f} "
                 f"MiB per layer per micro-batch")
    return "\n".join(lines)


def plan_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="haillm-plan", description="Per-rank memory (parameters, "
                                 "fp32 main grads, ZeRO-1 optimizer states, activations) and "
                                 "step FLOPs of a preset in a layout.")
    ap.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--precision", choices=list(BYTES), default="bf16")
    ap.add_argument("--no-sp", action="store_true", help="sequence parallelism off")
    ap.add_argument("--no-zero", action="store_true", help="replicate the optimizer states")
    ap.add_argument("--attention", choices=["flash", "plain"], default="flash")
    return ap


def run_plan(argv: list[str] | None = None) -> str:
    """Parse `haillm-plan` arguments and return the table (raises `ConfigError`)."""
    a = plan_parser().parse_args(argv)
    m = load_config(a.preset).model
    for name in ("dp", "tp", "pp", "microbatches", "micro_batch_size"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.seq_len is not None and a.seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {a.seq_len}")
    lay = Layout(dp=a.dp, tp=a.tp, pp=a.pp, microbatches=a.microbatches,
                 micro_batch_size=a.micro_batch_size, seq_len=a.seq_len,
                 precision=a.precision, sequence_parallel=not a.no_sp, zero=not a.no_zero,
                 attention=a.attention)
    title = (f"haillm-plan: {a.preset} ({m.n_params() / 1e9:.2f}B params), dp={a.dp} tp={a.tp} "
             f"pp={a.pp}, {a.microbatches} x {a.micro_batch_size} x "
             f"{a.seq_len or m.seq_len} tokens per DP rank, {a.precision}, "
             f"SP {'off' if a.no_sp else 'on'}, ZeRO-1 {'off' if a.no_zero else 'on'}")
    return plan_table(m, lay, title=title)
