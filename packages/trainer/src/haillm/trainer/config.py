"""The run's configuration: typed dataclasses, named presets, TOML files, `--set` overrides.

One `Config` holds everything a run needs, in five sections (`model`, `data`, `train`,
`parallel`, `run`). It is built in this order, each step overriding the previous one:

1. the dataclass defaults,
2. a named preset (`--preset tiny`),
3. a TOML file (`--config run.toml`, same sections as `<out>/config.toml`),
4. `--set section.key=value` overrides, then the dedicated flags (`--dp 2`, `--steps 100`...).

Unknown sections or keys are rejected with the closest valid name (a typo must never be
silently ignored). The resolved config is written to `<out>/config.toml` so that a run can be
reproduced with `--config <out>/config.toml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "check_sequence",
    "dump_toml",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration value, key, preset or layout that cannot work (the message says why)."""


@dataclass
class ModelConfig:
    """Shape of the DeepSeek-LLM decoder (paper Table 2)."""

    vocab_size: int = 4096
    """Vocabulary size (the BPE tokenizer is trained to this size on the embedded corpus)."""
    hidden_size: int = 128
    """Model width d_model."""
    n_layers: int = 4
    """Number of decoder blocks."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 4
    """Key/value heads; fewer than `n_heads` is grouped-query attention (the 67B model uses 8)."""
    intermediate_size: int = 344
    """Width of the SwiGLU MLP (about 8/3 d_model, as in the paper)."""
    seq_len: int = 128
    """Training sequence length in tokens."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.006
    """Standard deviation of the normal initialisation (the paper's 0.006)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def n_params(self, *, embedding: bool = True) -> int:
        """Parameter count (embedding and head are untied, so both count)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.n_kv_heads * self.head_dim
        per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
        total = self.n_layers * per_layer + d + d * v
        return total + (d * v if embedding else 0)


@dataclass
class DataConfig:
    """Where the tokens come from."""

    corpus: str = "stdlib"
    """`stdlib` (Python's own standard-library sources, found through `sysconfig`), or a
    comma-separated list of `.txt`/`.jsonl`/`.parquet`/`.arrow` files, Hugging Face
    `save_to_disk` folders or folders of such files (parquet and arrow need the `data` extra:
    `pip install haillm-trainer[data]`); or one pre-tokenised corpus read as-is: a `.bin`
    memmap or a folder written by `haillm-prepare`."""
    max_corpus_mb: float = 8.0
    """Read at most this many megabytes of text (files in sorted order, so it is
    deterministic); 0: no limit."""
    bin_dtype: str = "uint16"
    """Element type of a pre-tokenised `.bin` memmap (`uint16` or `uint32`)."""
    text_key: str = "text"
    """Key (`.jsonl`) or column (parquet, arrow, HF datasets) holding the document text."""
    jsonl_key: str = "text"
    """Alias of `text_key` (its old name, kept working): set either one."""
    val_fraction: float = 0.02
    """Share of the packed sequences held out for the validation loss."""
    tokenizer: str = ""
    """Path to a `tokenizer.json` to reuse; empty: train a byte-level BPE and cache it in `<out>`."""

    @property
    def key(self) -> str:
        """The text key in effect: `text_key`, or `jsonl_key` when only that one was set."""
        if self.text_key != "text" and self.jsonl_key not in ("text", self.text_key):
            raise ConfigError(f"data.text_key ({self.text_key!r}) and its alias data.jsonl_key "
                              f"({self.jsonl_key!r}) disagree; set only data.text_key")
        return self.text_key if self.text_key != "text" else self.jsonl_key


@dataclass
class TrainConfig:
    """Optimisation: the paper's AdamW and multi-step schedule."""

    steps: int = 200
    """Optimizer steps (the schedule spans all of them, even with `--exit-after`)."""
    global_batch: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    schedule: str = "multistep"
    """`multistep` (paper: 31.6 % of peak after 80 % of steps, 10 % after 90 %) or `cosine`."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of the peak."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (paper: 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (paper: 0.1); never applied to norm weights."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (paper: 1.0); 0 disables it."""
    eval_every: int = 50
    """Validation loss every N steps (and at the end); 0 disables it."""
    eval_batches: int = 2
    """Global batches of held-out sequences per validation."""
    seed: int = 1234
    """Seed of the initialisation and the data order."""
    precision: str = "bf16"
    """`bf16`, `fp16` (with dynamic loss scaling) or `fp32`."""
    init_from: str = ""
    """A Hugging Face Llama-format folder (`config.json` + safetensors) to start from:
    its weights, its model shape (which then overrides the preset's) and its tokenizer.json
    when present; the step counter starts at 0 with a fresh optimizer (continued
    pre-training, fine-tuning). Empty: the seeded initialisation. `--init-from`."""


@dataclass
class ParallelConfig:
    """The 3D layout and the switch of every technique."""

    dp: int = 1
    """Data-parallel degree (ZeRO-1 shards the optimizer over it)."""
    tp: int = 1
    """Tensor-parallel degree (Megatron column/row split)."""
    pp: int = 1
    """Pipeline-parallel degree (stages)."""
    cp: int = 1
    """Context-parallel degree: ring attention over `cp` ranks per sequence (zigzag layout,
    `seq_len` divisible by 2*cp); parameters reduce, and ZeRO-1 shards, over dp x cp."""
    microbatches: int = 4
    """Micro-batches per optimizer step and data-parallel rank (gradient accumulation)."""
    pipeline_schedule: str = "1f1b"
    """`1f1b`, `gpipe` or `interleaved` (with `chunks` model chunks per stage)."""
    chunks: int = 1
    """Model chunks per pipeline stage for the interleaved schedule."""
    sequence_parallel: bool = True
    """Shard norms/residuals along the sequence inside the TP group (no-op at tp = 1)."""
    zero: bool = True
    """ZeRO-1: shard fp32 master weights and Adam states over DP (else replicate them)."""
    tp_comm_overlap: bool = True
    """Overlap the TP/SP collectives with the GEMMs (haillm.parallel layers)."""
    overlap_grad_reduce: bool = True
    """Start the gradient reduce-scatter from the last micro-batch's backward."""
    attention: str = "auto"
    """flash_attention impl: `auto` (torch on CPU, Triton on CUDA), `torch` (alias `tiled`),
    `triton`, `reference`."""
    fused_norm: bool = True
    """Fused RMSNorm with the residual add."""
    fused_swiglu: bool = True
    """Merged gate-up projection through the fused `linear_swiglu` GEMM."""
    fused_cross_entropy: bool = True
    """In-place cross-entropy (or the vocab-parallel one under TP)."""
    recompute: str = "none"
    """Activation recomputation (`haillm.trainer.recompute`): `none`, `selective` (keep the
    GEMM inputs, recompute the norms and the SwiGLU activation in backward) or `full` (keep
    only each block's input, recompute the block)."""
    recompute_layers: int = 0
    """With `recompute`: only the first N blocks of each model chunk (Megatron's "block"
    method); 0: all of them."""


@dataclass
class RunConfig:
    """Where and how the run executes."""

    out: str = "runs/latest"
    """Run folder: config.toml, metrics.jsonl, tokenizer, checkpoints."""
    device: str = "cpu"
    """`cpu` (gloo) or `cuda` (NCCL)."""
    log_every: int = 1
    """Progress line every N steps (metrics.jsonl gets every step)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    exit_after: int = 0
    """Save and exit cleanly after this step (0: run to the end)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in `out`."""
    allow_changes: str = ""
    """Comma-separated config keys that `--resume` may find changed (e.g. `train.lr`), or
    `all`; by default a resume must keep the model, data, seed and optimizer settings."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept in `<out>/checkpoints` (older ones deleted; 0: keep all)."""
    sample_tokens: int = 48
    """Tokens generated at the end of the run (0: none)."""
    sample_prompt: str = "def "
    """Prompt of the final sample."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""


@dataclass
class Config:
    """Everything one run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> None:
        """Raise `ConfigError` for a layout that does not divide the world or the model."""
        m, p, t = self.model, self.parallel, self.train
        self.validate_ranges()
        n = p.dp * p.cp * p.tp * p.pp
        if world_size is not None and n != world_size:
            if p.cp == 1:
                raise ConfigError(
                    f"layout dp*tp*pp = {p.dp}*{p.tp}*{p.pp} = {n} does not match the world "
                    f"size {world_size}; pass --nproc {n} or change --dp/--tp/--pp/--cp")
            raise ConfigError(
                f"layout dp*cp*tp*pp = {p.dp}*{p.cp}*{p.tp}*{p.pp} = {n} does not match the "
                f"world size {world_size}; pass --nproc {n} or change --dp/--cp/--tp/--pp")
        if m.hidden_size % m.n_heads:
            raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be divisible by "
                              f"model.n_heads ({m.n_heads})")
        if m.head_dim % 2:
            raise ConfigError(f"head_dim ({m.head_dim}) must be even for RoPE")
        if m.n_heads % m.n_kv_heads:
            raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by "
                              f"model.n_kv_heads ({m.n_kv_heads})")
        for what, val in (("n_heads", m.n_heads), ("n_kv_heads", m.n_kv_heads),
                          ("vocab_size", m.vocab_size), ("intermediate_size", m.intermediate_size)):
            if val % p.tp:
                raise ConfigError(f"model.{what} ({val}) must be divisible by tp ({p.tp})")
        check_sequence(self)
        stages = p.pp * (p.chunks if p.pipeline_schedule == "interleaved" else 1)
        if m.n_layers < stages:
            raise ConfigError(f"model.n_layers ({m.n_layers}) must be >= the number of pipeline "
                              f"stages x chunks ({stages})")
        if p.pipeline_schedule not in ("1f1b", "gpipe", "interleaved"):
            raise ConfigError(f"parallel.pipeline_schedule must be 1f1b, gpipe or interleaved, "
                              f"got {p.pipeline_schedule!r}")
        if t.global_batch % (p.dp * p.microbatches):
            raise ConfigError(f"train.global_batch ({t.global_batch}) must be divisible by "
                              f"dp*microbatches ({p.dp}*{p.microbatches})")
        if t.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision must be bf16, fp16 or fp32, got {t.precision!r}")
        if t.schedule not in ("multistep", "cosine", "constant"):
            raise ConfigError(f"train.schedule must be multistep, cosine or constant, "
                              f"got {t.schedule!r}")
        if self.data.bin_dtype not in ("uint16", "uint32"):
            raise ConfigError(f"data.bin_dtype must be uint16 or uint32, got {self.data.bin_dtype!r}")
        if not self.data.key:
            raise ConfigError("data.text_key must name a key/column, got ''")
        if self.run.device not in ("cpu", "cuda"):
            raise ConfigError(f"run.device must be cpu or cuda, got {self.run.device!r}")

    def validate_ranges(self) -> None:
        """Raise `ConfigError` for a value outside its range (a type alone is not enough:
        `train.steps = -5` or `model.n_heads = 0` must never reach the trainer)."""
        for (section, key), (lo, hi) in RANGES.items():
            v = getattr(getattr(self, section), key)
            if isinstance(v, float) and v != v:
                raise ConfigError(f"{section}.{key} must be a number, got nan")
            if (lo is not None and (v < lo[0] or (lo[1] and v == lo[0]))) or \
                    (hi is not None and (v > hi[0] or (hi[1] and v == hi[0]))):
                raise ConfigError(f"{section}.{key} must be {_range_text(lo, hi)}, got {v!r}"
                                  f"{RANGE_HINTS.get((section, key), '')}")
        for section, key, options in CHOICES:
            v = getattr(getattr(self, section), key)
            if v not in options:
                raise ConfigError(f"{section}.{key} must be one of {', '.join(options)}, "
                                  f"got {v!r}")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch on one data-parallel rank."""
        return self.train.global_batch // (self.parallel.dp * self.parallel.microbatches)


def check_sequence(cfg: Config) -> None:
    """Raise `ConfigError` for a `model.seq_len` the layout cannot split (`Config.validate`
    and `haillm-plan` share it): by tp under SP, by 2*cp under CP, by cp*tp under both."""
    m, p = cfg.model, cfg.parallel
    # CP: the zigzag layout cuts every sequence into 2*cp equal chunks (rank r holds
    # chunks r and 2cp-1-r); SP then splits each CP rank's S/cp tokens over its TP group
    # (contiguously: the all-gather before attention restores the rank's two chunks), so
    # under both S must be divisible by 2*cp and S/cp by tp, i.e. by cp * lcm(2, tp).
    if p.cp > 1 and m.seq_len % (2 * p.cp):
        raise ConfigError(
            f"model.seq_len ({m.seq_len}) must be divisible by 2*cp = {2 * p.cp} under "
            f"context parallelism (the zigzag layout: 2*cp equal chunks, rank r holds "
            f"chunks r and 2*cp-1-r)")
    if p.sequence_parallel and p.tp > 1 and (m.seq_len // p.cp) % p.tp:
        if p.cp == 1:
            raise ConfigError(f"model.seq_len ({m.seq_len}) must be divisible by tp "
                              f"({p.tp}) under sequence parallelism")
        raise ConfigError(
            f"model.seq_len ({m.seq_len}) must be divisible by cp*tp = {p.cp * p.tp} "
            f"under context and sequence parallelism (each CP rank's seq_len/cp = "
            f"{m.seq_len // p.cp} tokens are split over tp = {p.tp} ranks)")


# --------------------------------------------------------------------------- ranges
# (section, key): (lower, upper) bounds, each (value, exclusive) or None
_GE0, _GE1, _GT0 = ((0, False), None), ((1, False), None), ((0, True), None)


RANGES: dict[tuple[str, str], tuple[tuple[float, bool] | None, tuple[float, bool] | None]] = {
    **{("model", k): _GE1 for k in ("vocab_size", "hidden_size", "n_layers", "n_heads",
                                     "n_kv_heads", "intermediate_size", "seq_len")},
    **{("model", k): _GT0 for k in ("rope_theta", "norm_eps", "init_std")},
    ("data", "max_corpus_mb"): _GT0,
    ("data", "val_fraction"): ((0, False), (1, True)),
    ("train", "steps"): _GE1, ("train", "global_batch"): _GE1, ("train", "lr"): _GE0,
    ("train", "warmup_steps"): _GE0, ("train", "min_lr_ratio"): ((0, False), (1, False)),
    ("train", "beta1"): ((0, False), (1, True)), ("train", "beta2"): ((0, False), (1, True)),
    ("train", "eps"): _GT0, ("train", "weight_decay"): _GE0, ("train", "grad_clip"): _GE0,
    ("train", "eval_every"): _GE0, ("train", "eval_batches"): _GE1,
    **{("parallel", k): _GE1 for k in ("dp", "tp", "pp", "cp", "microbatches", "chunks")},
    ("parallel", "recompute_layers"): _GE0,
    ("run", "log_every"): _GE1, ("run", "save_every"): _GE0, ("run", "exit_after"): _GE0,
    ("run", "keep_checkpoints"): _GE0, ("run", "sample_tokens"): _GE0,
}
RANGE_HINTS = {("run", "save_every"): " (0: only at the end)",
               ("parallel", "recompute_layers"): " (0: every block)",
               ("run", "exit_after"): " (0: run to the end)",
               ("run", "keep_checkpoints"): " (0: keep all)",
               ("train", "eval_every"): " (0: no validation)"}
CHOICES = [("data", "bin_dtype", ("uint16", "uint32")),
           ("train", "precision", ("bf16", "fp16", "fp32")),
           ("train", "schedule", ("multistep", "cosine", "constant")),
           ("parallel", "pipeline_schedule", ("1f1b", "gpipe", "interleaved")),
           ("parallel", "attention", ("auto", "tiled", "triton", "reference")),
           ("parallel", "recompute", ("none", "selective", "full")),
           ("run", "device", ("cpu", "cuda"))]


def _range_text(lo, hi) -> str:
    if hi is None:
        return f"{'>' if lo[1] else '>='} {lo[0]}"
    return f"in {'(' if lo[1] else '['}{lo[0]}, {hi[0]}{')' if hi[1] else ']'}"


# --------------------------------------------------------------------------- presets
# Only the keys that differ from the defaults. deepseek-7b / -67b are the paper's Table 2:
# DeepSeek LLM, arXiv 2401.02954 (DeepSeek-AI, 2024), Table 2 "Detailed specs of DeepSeek LLM
# family of models": 7B: 30 layers, d_model 4096, 32 heads, 32 KV heads, context 4096, batch
# size 2304, learning rate 4.2e-4; 67B: 95 layers, d_model 8192, 64 heads, 8 KV heads,
# context 4096, batch size 4608, learning rate 3.2e-4 (both 2.0T tokens, vocabulary 102400).
# "Batch size" counts sequences of 4096 tokens (2304 x 4096 = 9.4M tokens per step).
# The warm-up of 2000 steps is section 2.3; `steps` is a placeholder (2.0T tokens / 9.4M
# tokens is about 212k steps for the 7B model).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "micro": {  # tests: seconds on one core
        "model": dict(vocab_size=512, hidden_size=32, n_layers=4, n_heads=4, n_kv_heads=2,
                      intermediate_size=64, seq_len=16),
        "data": dict(max_corpus_mb=0.5),
        "train": dict(steps=20, global_batch=8, lr=1e-2, warmup_steps=2, eval_every=10,
                      eval_batches=1),
        "run": dict(sample_tokens=8),
    },
    "tiny": {  # the README's CPU run: minutes on 2 cores
        "model": dict(vocab_size=4096, hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=2,
                      intermediate_size=344, seq_len=128),
        "data": dict(max_corpus_mb=4.0),
        "train": dict(steps=200, global_batch=32, lr=3e-3, warmup_steps=20),
    },
    "small": {  # a small GPU model (~125M parameters)
        "model": dict(vocab_size=32000, hidden_size=768, n_layers=12, n_heads=12, n_kv_heads=12,
                      intermediate_size=2048, seq_len=1024),
        "data": dict(max_corpus_mb=64.0),
        "train": dict(steps=2000, global_batch=64, lr=6e-4, warmup_steps=200),
    },
    "deepseek-7b": {
        "model": dict(vocab_size=102400, hidden_size=4096, n_layers=30, n_heads=32,
                      n_kv_heads=32, intermediate_size=11008, seq_len=4096),
        # Table 2: batch size 2304 sequences of 4096 tokens (9.4M tokens), peak lr 4.2e-4
        "train": dict(global_batch=2304, lr=4.2e-4, warmup_steps=2000, steps=10000),
        "run": dict(device="cuda"),
    },
    "deepseek-67b": {
        "model": dict(vocab_size=102400, hidden_size=8192, n_layers=95, n_heads=64,
                      n_kv_heads=8, intermediate_size=22016, seq_len=4096),
        # Table 2: batch size 4608 sequences of 4096 tokens (18.9M tokens), peak lr 3.2e-4
        "train": dict(global_batch=4608, lr=3.2e-4, warmup_steps=2000, steps=10000),
        "run": dict(device="cuda"),
    },
}


def _closest(name: str, options: list[str]) -> str:
    hit = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (did you mean {hit[0]!r}?)" if hit else ""


def _section_fields(cfg: Config) -> dict[str, dict[str, dataclasses.Field]]:
    return {f.name: {g.name: g for g in fields(getattr(cfg, f.name))} for f in fields(cfg)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {typ}") from None


def _apply(cfg: Config, section: str, key: str, value: Any, *, source: str) -> None:
    sections = _section_fields(cfg)
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}"
                          f"{_closest(section, list(sections))}; sections: {', '.join(sections)}")
    if key not in sections[section]:
        raise ConfigError(f"{source}: unknown key {section}.{key}"
                          f"{_closest(f'{section}.{key}', [f'{section}.{k}' for k in sections[section]])}")
    f = sections[section][key]
    setattr(getattr(cfg, section), key, _coerce(value, f.type, f"{source} {section}.{key}"))


def apply_dict(cfg: Config, data: dict[str, Any], *, source: str) -> Config:
    """Apply a nested `{section: {key: value}}` mapping (a preset or a TOML file)."""
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section!r} must be a table [{section}]")
        for key, value in values.items():
            _apply(cfg, section, key, value, source=source)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings (the `--set` flag)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-3")
        path, value = item.split("=", 1)
        section, key = path.strip().split(".", 1)
        _apply(cfg, section, key, value.strip(), source="--set")
    return cfg


def load_config(preset: str | None = None, file: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults, then the preset, then the TOML file, then the `--set` overrides."""
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{_closest(preset, list(PRESETS))}; "
                              f"presets: {', '.join(PRESETS)}")
        apply_dict(cfg, PRESETS[preset], source=f"preset {preset}")
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file")
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {str(path)!r} is not valid TOML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {str(path)!r} cannot be read: {e}") from None
        apply_dict(cfg, data, source=str(path))
    return apply_overrides(cfg, overrides or [])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML text (readable back with `load_config(file=...)`)."""
    lines = ["# haillm-train resolved configuration (reuse with --config this-file)"]
    for section, values in cfg.to_dict().items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
