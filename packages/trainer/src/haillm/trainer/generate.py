"""`haillm-generate`: sampling from a checkpoint of any layout, in one process.

Loading: a checkpoint stores every weight under its `DeepSeekLM` name with its global shape
(see `haillm.trainer.checkpoint`), so whatever (dp, tp, pp) layout trained it, one process
reads the full tensors (`load_logical`, DCP without a process group) straight into a
`DeepSeekLM`. The unsharded `model.safetensors` export loads the same way.

Decoding is the model's own `DeepSeekLM.generate`: a KV cache and `flash_attention` with
seqlen_q < seqlen_k (bottom-right causal), one attention and one sampler for training and
generation. What the real servers add (vLLM, TensorRT-LLM): paged caches shared across
requests, continuous batching, and fused decode-attention kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from haillm.trainer.config import Config, apply_dict
from haillm.trainer.model import DeepSeekLM

__all__ = ["export_safetensors", "generate", "load_model", "run_generate"]


def generate(model: DeepSeekLM, tokens: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.8, top_k: int = 20,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """`model.generate` (KV cache): continue `tokens` (B, S) -> (B, S + max_new_tokens)."""
    return model.generate(tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                          generator=generator)


def load_model(path: str | Path, *, dtype=torch.float32, device="cpu",
               log=None) -> tuple[DeepSeekLM, Config, Path]:
    """A full model from a checkpoint folder, a run folder, a `model.safetensors` export or
    a Hugging Face Llama folder (`config.json` + safetensors: `haillm.trainer.hf`).

    `log` is told every refused checkpoint and which one is used (default: refusals only,
    on stderr). A damaged checkpoint raises `CheckpointError` naming what is wrong.

    Returns (model in eval mode, the run's config, the run folder holding the tokenizer).
    """
    from haillm.trainer.checkpoint import load_logical
    from haillm.trainer.config import load_config

    path = Path(path)
    from haillm.trainer.hf import is_hf_folder, load_hf_model

    if is_hf_folder(path):  # a Hugging Face Llama folder (an export, or DeepSeek LLM's own)
        return load_hf_model(path, dtype=dtype, device=device)
    if path.suffix == ".safetensors" or (path.is_dir() and not (path / "checkpoints").is_dir()
                                         and (path / "model.safetensors").is_file()
                                         and not (path / "manifest.json").is_file()):
        file = path if path.suffix == ".safetensors" else path / "model.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist")
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        run = file.parent
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
        if "config" in meta:  # our export carries the run's config
            cfg = apply_dict(Config(), json.loads(meta["config"]), source=str(file))
        else:  # the trainer's end-of-run model.safetensors sits next to config.toml
            cfg = load_config(None, str(run / "config.toml"))
        state = load_file(str(file))
    else:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        state, manifest = load_logical(path, log=log)
        cfg = apply_dict(Config(), manifest["config"], source="checkpoint manifest")
        run = Path(cfg.run.out) if (Path(cfg.run.out) / "config.toml").is_file() else path
        for cand in (path, path.parent, path.parent.parent):
            if (cand / "tokenizer.json").is_file():
                run = cand
    model = DeepSeekLM(cfg.model, lazy=True)  # meta parameters: nothing drawn, then replaced
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        from haillm.trainer.checkpoint import CheckpointError

        raise CheckpointError(f"{path}: the weights do not fit the model its config describes "
                              f"({str(e).strip().splitlines()[0]})") from None
    return model.to(device=device, dtype=dtype).eval(), cfg, run


def export_safetensors(checkpoint: str | Path, file: str | Path) -> Path:
    """Write a checkpoint's weights (fp32 master, logical names) as one unsharded file."""
    import json

    from safetensors.torch import save_file

    from haillm.trainer.checkpoint import load_logical

    state, manifest = load_logical(checkpoint)
    file = Path(file)
    save_file({k: v.contiguous() for k, v in state.items()}, str(file),
              metadata={"step": str(manifest["step"]), "format": "haillm DeepSeekLM",
                        "config": json.dumps(manifest["config"])})
    return file


def generate_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="haillm-generate", description="Sample text from a "
                                 "checkpoint (any training layout) or a safetensors export.")
    ap.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint folder, a "
                    "run folder (its newest complete checkpoint), a model.safetensors file or "
                    "a Hugging Face Llama folder")
    ap.add_argument("--prompt", required=True, metavar="TEXT")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=20, help="0: the whole vocabulary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    return ap


def run_generate(argv: list[str] | None = None) -> str:
    """Parse `haillm-generate` arguments, load, sample; returns the text."""
    from tokenizers import Tokenizer

    a = generate_parser().parse_args(argv)
    if a.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if a.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: the whole vocabulary), got {a.top_k}")
    if a.device not in ("cpu", "cuda") and not a.device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {a.device!r}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    model, cfg, run = load_model(a.checkpoint, device=a.device, log=lambda s: print(
        f"haillm-generate: {s.removeprefix('haillm: ')}", file=sys.stderr, flush=True))
    tok_file = Path(a.tokenizer or cfg.data.tokenizer or run / "tokenizer.json")
    if not tok_file.is_file():
        raise FileNotFoundError(f"no tokenizer at {tok_file} (pass --tokenizer FILE)")
    tok = Tokenizer.from_file(str(tok_file))
    ids = tok.encode(a.prompt).ids or [0]
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    out = generate(model, torch.tensor([ids], device=a.device), a.max_new_tokens, temperature=a.temperature,
                   top_k=a.top_k, generator=g)
    return tok.decode(out[0].cpu().tolist())
