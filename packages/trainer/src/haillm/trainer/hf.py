"""Hugging Face Llama folders in and out: `haillm-export --hf`, `--init-from`, HF generation.

DeepSeek LLM 7B and 67B are published as `LlamaForCausalLM` folders, and `DeepSeekLM` is the
same network: pre-norm RMSNorm blocks, rotate-half RoPE (Hugging Face's Llama layout, so the
Q and K rows need **no** permutation, unlike Meta's original interleaved checkpoints), SwiGLU,
grouped-query attention, untied head. Only the names and two merges differ, and the shard
plan (`haillm.trainer.shard_plan`) already records both: every parameter's ``hf`` names, one
per merged part (``attn.wqkv`` = [q_proj; k_proj; v_proj], ``mlp.w_gate_up`` = [gate_proj;
up_proj]). This module reads that table; it holds no name map of its own.

* **Export** (`export_hf`): a checkpoint of any layout stores full fp32 master tensors under
  their logical names, so one process streams them shard by shard into safetensors files of
  at most `max_shard_size` bytes (5 GB by default, Hugging Face's own default), with
  `model.safetensors.index.json`, `config.json`, `generation_config.json` and the
  tokenizer files. Only the tensors of the shard being written are in memory (each is read
  from the checkpoint when its shard is written: `load_logical(keys=...)`), so a 67B export
  needs ~5 GB of RAM, not 270 GB.
* **Import** (`HFReader`): the safetensors files are memory-mapped (`safe_open`), and a rank
  reads only the index ranges it owns (`Shard.slices`, per merged part) through
  `get_slice(name)[rows, cols]`: `parallelize(..., source=HFReader(dir))` builds a 67B stage
  on each rank without any rank ever holding a full tensor it does not own.
* **Config** (`hf_config`, `model_config_from_hf`): every shape field both ways; what
  `DeepSeekLM` cannot represent (biases, rope scaling, another activation or head size) is
  refused by name, never silently dropped.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from haillm.trainer.config import Config, ConfigError, ModelConfig, apply_dict
from haillm.trainer.shard_plan import ParamSpec, param_specs

__all__ = ["DTYPE_NAMES", "HFReader", "apply_init_from", "conversion_table",
           "explicit_model_keys", "export_hf", "hf_config", "is_hf_folder", "load_hf_model",
           "model_config_from_hf", "read_hf_config"]

ARCHITECTURE = "LlamaForCausalLM"
DTYPE_NAMES = {"fp32": ("float32", torch.float32), "bf16": ("bfloat16", torch.bfloat16)}
"""`--dtype` -> (config.json's `torch_dtype`, the torch dtype of the exported tensors)."""
MAX_SHARD_SIZE = 5 * 10**9
"""Hugging Face's default `max_shard_size` ("5GB", decimal)."""

# (ModelConfig field, config.json key): the fields that `--init-from` takes from config.json
_FROM_HF = (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
            ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
            ("n_kv_heads", "num_key_value_heads"), ("intermediate_size", "intermediate_size"),
            ("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps"))


# ------------------------------------------------------------------------------ config.json
def read_hf_config(folder: str | Path, *, what: str = "--init-from") -> dict:
    """The parsed `config.json` of an HF model folder (`ConfigError` naming `what` if absent)."""
    folder = Path(folder)
    f = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"{what} {str(folder)!r}: no such folder")
    if not f.is_file():
        raise ConfigError(f"{what} {str(folder)!r}: no config.json (not a Hugging Face model "
                          "folder)")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{what} {str(f)!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{what} {str(f)!r} is not a JSON object")
    return cfg


def _rope_theta(hf: dict) -> float:
    """RoPE base: `rope_theta` (transformers 4.x), or `rope_parameters.rope_theta` (5.x)."""
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict, base: ModelConfig | None = None, *,
                         where: str = "config.json") -> ModelConfig:
    """A `ModelConfig` with the shape of an HF Llama `config.json` (the other fields, e.g.
    `seq_len`, from `base`). Raises `ConfigError` for what `DeepSeekLM` cannot compute."""
    import dataclasses

    arch = hf.get("architectures") or [ARCHITECTURE]
    if hf.get("model_type", "llama") != "llama" or ARCHITECTURE not in arch:
        raise ConfigError(f"{where}: model_type {hf.get('model_type')!r} / architectures "
                          f"{arch}: only Llama-architecture models ({ARCHITECTURE}, as "
                          "DeepSeek LLM 7B/67B) map onto DeepSeekLM")
    missing = [k for _, k in _FROM_HF[:4] + _FROM_HF[5:6] if k not in hf]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    refuse = []
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        refuse.append(f"hidden_act {hf['hidden_act']!r} (DeepSeekLM's MLP is SwiGLU: silu)")
    for k in ("attention_bias", "mlp_bias"):
        if hf.get(k):
            refuse.append(f"{k} true (DeepSeekLM's projections have no bias)")
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4.x, 5.x
        rope = hf.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in (None, "default"):
            refuse.append(f"{key} of type {kind!r} (DeepSeekLM's RoPE is unscaled)")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != int(hf["hidden_size"]):
        refuse.append(f"head_dim {head_dim} != hidden_size / num_attention_heads "
                      f"({hf['hidden_size']} / {heads})")
    if refuse:
        raise ConfigError(f"{where}: not representable as a DeepSeekLM: " + "; ".join(refuse))
    values = {field: hf.get(key) for field, key in _FROM_HF}
    values["n_kv_heads"] = hf.get("num_key_value_heads") or heads
    values["rope_theta"] = _rope_theta(hf)
    values["norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
    values = {k: (float(v) if k in ("rope_theta", "norm_eps") else int(v))
              for k, v in values.items()}
    return dataclasses.replace(base or ModelConfig(), **values)


def hf_config(m: ModelConfig, *, dtype: str = "fp32", bos_token_id: int | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """The `config.json` of `m` as a `LlamaForCausalLM` (every shape field; untied head).

    Both transformers generations read it: 4.x's `rope_theta` / `torch_dtype` and 5.x's
    `rope_parameters` / `dtype` are written side by side.
    """
    name = DTYPE_NAMES[dtype][0]
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim, "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": m.init_std,
        "pretraining_tp": 1, "use_cache": True, "torch_dtype": name, "dtype": name,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def explicit_model_keys(config_file: str | None, overrides: list[str]) -> dict[str, str]:
    """`{model field: where it was set}` for the fields a user set explicitly: the `[model]`
    table of `--config FILE` and `--set model.KEY=...` (a preset's values are defaults)."""
    from haillm.trainer.config import tomllib

    out: dict[str, str] = {}
    if config_file and Path(config_file).is_file():
        try:
            with open(config_file, "rb") as fh:
                for k in (tomllib.load(fh).get("model") or {}):
                    out[k] = f"--config {config_file}"
        except (tomllib.TOMLDecodeError, OSError):
            pass  # load_config has already reported it
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model."):
            out[key[len("model."):]] = f"--set {item}"
    return out


def apply_init_from(cfg: Config, explicit: dict[str, str] | None = None) -> Config:
    """Resolve `train.init_from` (in place): the model shape from the folder's `config.json`,
    and `data.tokenizer` := its `tokenizer.json` when present and none is configured.

    A shape field that `explicit` names (see `explicit_model_keys`) and that disagrees with
    the folder raises `ConfigError`; unnamed fields are simply taken from the folder (a
    preset's shape is a default). Idempotent: every rank may call it again.
    """
    folder = cfg.train.init_from
    if not folder:
        return cfg
    hf = read_hf_config(folder)
    new = model_config_from_hf(hf, cfg.model, where=f"--init-from {folder}/config.json")
    clash = [f"model.{k} = {getattr(cfg.model, k)!r} ({src}), config.json has "
             f"{getattr(new, k)!r}" for k, src in (explicit or {}).items()
             if hasattr(new, k) and k in dict(_FROM_HF) and getattr(new, k) != getattr(cfg.model, k)]
    if clash:
        raise ConfigError(f"--init-from {folder}: the model shape comes from its config.json, "
                          "but " + "; ".join(clash) + "; drop those settings")
    cfg.model = new
    tok = Path(folder) / "tokenizer.json"
    if not cfg.data.tokenizer and tok.is_file():
        cfg.data.tokenizer = str(tok)
    return cfg


# ------------------------------------------------------------------------------ reading
def _weight_files(folder: Path) -> dict[str, Path]:
    """`{HF tensor name: safetensors file}` from the index, or from the file(s) themselves."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, OSError) as e:
            raise ConfigError(f"{index}: not a safetensors index ({e})") from None
        return {k: folder / v for k, v in wm.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no *.safetensors weights (only safetensors folders are "
                          "read: convert a pytorch_model.bin folder with transformers' "
                          "save_pretrained(safe_serialization=True))")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update(dict.fromkeys(h.keys(), f))
    return out


class HFReader:
    """`DeepSeekLM` parameters read from an HF Llama folder, memory-mapped, slice by slice.

    A `parallelize` source: `reader(name)` is the full fp32 tensor of parameter `name`
    (merged parts concatenated), and `reader.local(name, spec, rank, tp)` is the slice that TP
    rank `rank` of `tp` owns, read straight from the files through `safe_open(...).get_slice`
    (only those bytes are touched: the files are mapped, not loaded).

    Args:
        folder: the HF folder (`config.json`, `*.safetensors`, optional index).
        cfg: the model shape (default: from the folder's `config.json`).
    """

    def __init__(self, folder: str | Path, cfg: ModelConfig | None = None):
        self.folder = Path(folder)
        self.hf = read_hf_config(self.folder)
        self.cfg = cfg or model_config_from_hf(self.hf, where=f"{self.folder}/config.json")
        self.specs = param_specs(self.cfg)
        self.files = _weight_files(self.folder)
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0  # tensor bytes returned so far (the test of "only its slices")

    def _slice(self, hf_name: str):
        from safetensors import safe_open

        name = hf_name
        if name not in self.files and name == "lm_head.weight" and \
                self.hf.get("tie_word_embeddings"):
            name = "model.embed_tokens.weight"  # a tied head is the embedding table
        if name not in self.files:
            raise ConfigError(f"{self.folder}: tensor {hf_name} is missing from the "
                              "safetensors files")
        f = self.files[name]
        if f not in self._handles:
            if not f.is_file():
                raise ConfigError(f"{self.folder}: {f.name} (in the index) does not exist")
            self._handles[f] = safe_open(str(f), "pt")
        return self._handles[f].get_slice(name)

    def local(self, name: str, spec: ParamSpec | None, rank: int, tp: int) -> torch.Tensor:
        """The fp32 slice of parameter `name` that TP rank `rank` of `tp` holds (its local
        shape, `spec.shard.local_shape`), read from the HF tensors of its parts."""
        spec = spec or self.specs[name]
        parts = spec.parts or ((name, spec.shape[0]),)
        if len(parts) != len(spec.hf):
            raise ValueError(f"{name}: {len(parts)} parts but {len(spec.hf)} HF names")
        sources, start = [], 0  # (HF name, first row in the merged tensor, rows)
        for (_, rows), hf_name in zip(parts, spec.hf):
            sl = self._slice(hf_name)
            want = (rows, *spec.shape[1:])
            if tuple(sl.get_shape()) != want:
                raise ConfigError(f"{self.folder}: {hf_name} has shape {tuple(sl.get_shape())}, "
                                  f"the model of its config.json needs {want}")
            sources.append((sl, start, rows))
            start += rows
        pieces = []
        for s in spec.shard.slices(spec.shape, rank, tp):
            rows, rest = s[0], s[1:]
            row_pieces = []
            for sl, first, n in sources:  # the parts that rows [rows.start, rows.stop) cover
                a, b = max(rows.start, first), min(rows.stop, first + n)
                if a < b:
                    row_pieces.append(sl[(slice(a - first, b - first), *rest)])
            pieces.append(torch.cat(row_pieces) if len(row_pieces) > 1 else row_pieces[0])
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=spec.shard.dim)
        out = out.to(torch.float32)
        self.bytes_read += out.numel() * 4
        return out

    def __call__(self, name: str) -> torch.Tensor:
        """The full fp32 tensor of parameter `name`."""
        return self.local(name, self.specs[name], 0, 1)

    def close(self) -> None:
        self._handles.clear()


def is_hf_folder(path: str | Path) -> bool:
    """A folder with an HF `config.json` and safetensors weights (not a haillm run folder)."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file() and not (p / "manifest.json").exists()
            and ((p / "model.safetensors.index.json").is_file()
                 or any(p.glob("*.safetensors"))))


def load_hf_model(folder: str | Path, *, dtype=torch.float32, device="cpu"):
    """A whole `DeepSeekLM` from an HF folder, one tensor at a time.

    Returns (model in eval mode, a `Config` with its shape (`seq_len` =
    `max_position_embeddings`, `data.tokenizer` = its tokenizer.json when present), folder).
    """
    from haillm.trainer.model import DeepSeekLM

    folder = Path(folder)
    hf = read_hf_config(folder, what="--checkpoint")
    cfg = Config()
    cfg.model = model_config_from_hf(hf, cfg.model, where=f"{folder}/config.json")
    cfg.model.seq_len = int(hf.get("max_position_embeddings") or cfg.model.seq_len)
    if (folder / "tokenizer.json").is_file():
        cfg.data.tokenizer = str(folder / "tokenizer.json")
    reader = HFReader(folder, cfg.model)
    model = DeepSeekLM(cfg.model, lazy=True)
    model.materialize_(lambda name, _p: reader(name), dtype=dtype, device=device)
    reader.close()
    return model.eval(), cfg, folder


# ------------------------------------------------------------------------------ tokenizer
def _token_text(v) -> str | None:
    """A tokenizer_config.json special token: a string or an AddedToken dict."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _find_tokenizer(ckpt: Path, cfg: Config) -> Path | None:
    """The tokenizer.json of a checkpoint's run: the run folder's (next to `checkpoints/`),
    else the configured `data.tokenizer`, else a pre-tokenised corpus folder's, else the one
    in `run.out`."""
    for cand in (ckpt / "tokenizer.json", ckpt.parent / "tokenizer.json",
                 ckpt.parent.parent / "tokenizer.json",
                 Path(cfg.data.tokenizer) if cfg.data.tokenizer else None,
                 Path(cfg.data.corpus) / "tokenizer.json" if "," not in cfg.data.corpus
                 else None,
                 Path(cfg.run.out) / "tokenizer.json"):
        if cand is not None and cand.is_file():
            return cand
    return None


def _write_tokenizer(tok_file: Path, out: Path, seq_len: int) -> dict[str, int | None]:
    """Copy `tokenizer.json` into `out` with a `tokenizer_config.json` that `AutoTokenizer`
    reads (eos, bos and pad set); a `tokenizer_config.json` beside the source (an HF folder's
    own: its chat template, its special tokens) is kept and completed. Returns the ids."""
    from tokenizers import Tokenizer

    from haillm.trainer.data import EOS

    tok = Tokenizer.from_file(str(tok_file))
    side = tok_file.parent / "tokenizer_config.json"
    tc = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
    eos = _token_text(tc.get("eos_token")) or (EOS if tok.token_to_id(EOS) is not None else None)
    if eos is None:
        raise ConfigError(f"{tok_file}: no EOS token ({EOS!r}, or eos_token in a "
                          "tokenizer_config.json beside it)")
    # the trainer's BPE has one special token: it ends every document and also begins and pads
    bos = _token_text(tc.get("bos_token")) or eos
    pad = _token_text(tc.get("pad_token")) or eos
    tc.update({"eos_token": eos, "bos_token": bos, "pad_token": pad})
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tc.setdefault("model_max_length", seq_len)
    tc.setdefault("clean_up_tokenization_spaces", False)
    shutil.copyfile(tok_file, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": pad}, indent=2) + "\n",
        encoding="utf-8")
    return {k: tok.token_to_id(v) for k, v in (("bos_token_id", bos), ("eos_token_id", eos),
                                                ("pad_token_id", pad))}


# ------------------------------------------------------------------------------ export
def _plan_shards(specs: dict[str, ParamSpec], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Parameters grouped, in model order, into shards of at most `max_bytes` (a parameter
    larger than that gets a shard of its own; a merged one is never split across shards)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        n = itemsize * int(torch.Size(spec.shape).numel())
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _hf_tensors(spec: ParamSpec, full: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    """One parameter's full tensor -> `{HF name: tensor}`, split into its parts (copies: a
    safetensors file may not hold views of one storage)."""
    rows = [r for _, r in spec.parts] or [spec.shape[0]]
    return {h: t.to(dtype).clone().contiguous() for h, t in zip(spec.hf, full.split(rows))}


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32",
              max_shard_size: int = MAX_SHARD_SIZE,
              log: Callable[[str], None] | None = None) -> Path:
    """Write a checkpoint (or a run folder's newest one) as an HF `LlamaForCausalLM` folder.

    Args:
        checkpoint: a checkpoint folder, or a run folder (its newest complete checkpoint), of
            any training layout: it stores the full fp32 master tensors.
        out: the folder to write (refused if it holds anything but an earlier export).
        dtype: `fp32` (the masters, exactly) or `bf16` (rounded to nearest).
        max_shard_size: bytes per safetensors shard at most (one tensor larger than that
            gets a shard of its own).
        log: progress messages (default: none).

    Returns `out`. Memory: one shard's tensors at a time (plus one tensor's HF copies).
    """
    from safetensors.torch import save_file

    from haillm.trainer.checkpoint import _resolve, load_logical

    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if max_shard_size < 1:
        raise ConfigError(f"--max-shard-size must be >= 1 byte, got {max_shard_size}")
    log = log or (lambda s: None)
    ckpt, manifest = _resolve(Path(checkpoint))  # verified once (sizes and checksums)
    cfg = apply_dict(Config(), manifest["config"], source=f"{ckpt}/manifest.json")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (
            (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()))):
        raise ConfigError(f"--hf {str(out)!r} exists and is not an empty folder or an earlier "
                          "export; choose another folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = param_specs(cfg.model)
    tdtype = DTYPE_NAMES[dtype][1]
    shards = _plan_shards(specs, torch.finfo(tdtype).bits // 8, max_shard_size)
    weight_map, total = {}, 0
    log(f"exporting {ckpt} (step {manifest['step']}, {cfg.model.n_params() / 1e6:.2f}M "
        f"params) as {dtype} in {len(shards)} shard(s) to {out}")
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        keys = {n: (specs[n].shape, torch.float32) for n in names}
        full, _ = load_logical(ckpt, keys, verify=False)  # only this shard's tensors
        tensors = {}
        for n in names:
            tensors.update(_hf_tensors(specs[n], full.pop(n), tdtype))
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        for h, t in tensors.items():
            weight_map[h] = file
            total += t.numel() * t.element_size()
        del tensors, full
        log(f"  wrote {file} ({len(names)} parameters)")
    index = {"metadata": {"total_size": total, "haillm_step": manifest["step"],
                          "haillm_weights": "fp32 master weights" + (
                              ", rounded to bf16" if dtype == "bf16" else "")},
             "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                      encoding="utf-8")
    tok_file = _find_tokenizer(ckpt, cfg)
    ids: dict[str, int | None] = {}
    if tok_file is not None:
        ids = _write_tokenizer(tok_file, tmp, cfg.model.seq_len)
    else:
        log("  no tokenizer.json found for this run (a pre-tokenised corpus without one): "
            "the folder has no tokenizer files")
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg.model, dtype=dtype, **ids),
                                                indent=2) + "\n", encoding="utf-8")
    gen = {k: v for k, v in ids.items() if v is not None}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n",
                                                encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)  # an earlier export (checked above): replaced whole, never mixed
    os.rename(tmp, out)
    return out


# ------------------------------------------------------------------------------ docs
def conversion_table(cfg: ModelConfig | None = None) -> str:
    """The Markdown table HF name <-> haillm name <-> TP rule, rendered from the shard plan
    (`cfg` default: the deepseek-67b preset, whose GQA shows the unequal Q/K/V parts)."""
    import dataclasses

    from haillm.trainer.config import load_config

    m = dataclasses.replace(cfg or load_config("deepseek-67b").model, n_layers=1)
    rules = {"column": "column (dim 0)", "row": "row (dim 1)", "vocab": "vocab (dim 0)",
             "replicated": "replicated"}
    lines = ["| Hugging Face `LlamaForCausalLM` | haillm `DeepSeekLM` | rows | HF shape "
             "| TP rule |", "|---|---|---|---|---|"]
    for spec in param_specs(m).values():
        parts = spec.parts or ((spec.name, spec.shape[0]),)
        start = 0
        for (_, rows), hf_name in zip(parts, spec.hf):
            where = f"{start}:{start + rows}" if spec.parts else "all"
            rule = rules[spec.shard.kind]
            if spec.parts:
                rule += ", each part split in tp"
            lines.append(f"| `{hf_name.replace('layers.0.', 'layers.{i}.')}` "
                         f"| `{spec.name.replace('layers.0.', 'layers.{i}.')}` | {where} "
                         f"| {list((rows, *spec.shape[1:]))} | {rule} |")
            start += rows
    return "\n".join(lines) + "\n"

