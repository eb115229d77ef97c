"""A run folder belongs to one run: refusing to mix two, moving one aside, checking a resume.

A folder *holds a run* once a run has logged a step (`metrics.jsonl`), saved a checkpoint or
written its final weights. Training into such a folder without `--resume` is refused
(`ConfigError`): continue it with `--resume`, choose another `--out`, or pass `--overwrite`,
which renames the old run to `<out>.prev-<time>` (nothing is deleted) and starts afresh.

`--resume` continues the *same* run: the checkpoint's config must agree with the new one on
the model, the data, the seed and the optimizer's hyper-parameters (`IDENTITY`); the layout,
the number of steps, the save cadence and the logging may change. A different run is refused
naming the differing keys, unless `--allow-change KEY` (`run.allow_changes`) says otherwise;
the model's shape can never change (the weights would not fit).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from haillm.trainer.checkpoint import CheckpointError, checkpoints, verify_checkpoint
from haillm.trainer.config import Config, ConfigError

__all__ = ["IDENTITY", "SHAPE_KEYS", "check_resume", "check_same_run", "describe_run",
           "find_resume_checkpoint", "prepare_run_folder", "same_run_diff"]

SHAPE_KEYS = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
              "intermediate_size")
"""Model keys that decide the tensors' shapes: a checkpoint with others never loads."""

IDENTITY: dict[str, tuple[str, ...] | None] = {
    "model": None,  # every key
    "data": None,
    "train": ("seed", "global_batch", "precision", "lr", "warmup_steps", "schedule",
              "min_lr_ratio", "beta1", "beta2", "eps", "weight_decay", "grad_clip"),
}
"""The config keys that make a run the same run (None: every key of the section)."""

CACHE_FILES = ("tokenizer.json", "tokens.bin", "tokens.json")
"""The data cache of a run folder: deterministic, so `--overwrite` links it into the new run."""


def _markers(out: Path) -> list[str]:
    """What in `out` shows that a run already used it (empty: it holds no run)."""
    found = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        steps = []
        for ln in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                steps.append(int(json.loads(ln)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
        found.append(f"steps {min(steps)}-{max(steps)} in metrics.jsonl" if steps else
                     "a metrics.jsonl")
    ckpts = checkpoints(out / "checkpoints")
    if ckpts:
        found.append("checkpoints at step " + ", ".join(str(int(p.name.split("_")[1]))
                                                        for p in ckpts))
    if (out / "model.safetensors").is_file():
        found.append("a final model.safetensors")
    return found


def describe_run(out: Path) -> str:
    """`'steps 1-12 in metrics.jsonl, checkpoints at step 4, 8, 12'`, or '' for none."""
    return ", ".join(_markers(Path(out)))


def _move_aside(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dst = out.with_name(f"{out.name}.prev-{stamp}")
    n = 1
    while dst.exists():
        n += 1
        dst = out.with_name(f"{out.name}.prev-{stamp}-{n}")
    os.rename(out, dst)
    out.mkdir(parents=True)
    for name in CACHE_FILES:  # deterministic: the new run need not tokenise again
        src = dst / name
        if src.is_file():
            try:
                os.link(src, out / name)
            except OSError:
                shutil.copy2(src, out / name)
    return dst


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {str(out)!r} is not writable: "
                          f"{e.strerror or e}") from None


def prepare_run_folder(cfg: Config, log=None, *, overwrite: bool = False) -> Path | None:
    """Make `cfg.run.out` ready for this run, before any expensive work.

    Raises `ConfigError` if the folder is not writable, or holds a run and neither
    `run.resume` nor `overwrite` is set. With `overwrite`, the old run is renamed aside
    (its new path is returned and reported to `log`).
    """
    out = Path(cfg.run.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    moved = None
    if not cfg.run.resume and out.is_dir():
        held = describe_run(out)
        if held and not overwrite:
            raise ConfigError(
                f"{out} already holds a run ({held}); continue it with --resume, choose a new "
                f"--out, or pass --overwrite to move the old run aside")
        if held:
            moved = _move_aside(out)
            if log:
                log(f"haillm-train: --overwrite: moved the previous run ({held}) to {moved}")
    _check_writable(out)
    return moved


def _flat(d: dict) -> dict[str, object]:
    return {f"{s}.{k}": v for s, kv in d.items() if isinstance(kv, dict) for k, v in kv.items()}


def _allowed(cfg_now: dict) -> set[str]:
    raw = str(cfg_now.get("run", {}).get("allow_changes", "") or "")
    return {a.strip() for a in raw.split(",") if a.strip()}


def same_run_diff(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(model-shape differences, other identity differences) between a checkpoint's config
    and this run's, as `'key (saved value saved, new value now)'` texts; the keys named in
    `run.allow_changes` (or `all`) are not reported in the second list."""
    allowed = _allowed(now)
    shape, other = [], []
    fs, fn = _flat(saved), _flat(now)
    for section, keys in IDENTITY.items():
        names = keys if keys is not None else sorted(
            k.split(".", 1)[1] for k in fn if k.startswith(section + "."))
        for k in names:
            key = f"{section}.{k}"
            if key not in fs or key not in fn or fs[key] == fn[key]:
                continue
            if section == "model" and k in SHAPE_KEYS:
                shape.append(f"{k} ({fs[key]} saved, {fn[key]} now)")
            elif "all" not in allowed and key not in allowed:
                other.append(f"{key} ({fs[key]!r} saved, {fn[key]!r} now)")
    return shape, other


def check_same_run(path: Path, manifest: dict, cfg: Config) -> None:
    """Raise `CheckpointError` if checkpoint `path` belongs to another model or run."""
    shape, other = same_run_diff(manifest.get("config", {}), cfg.to_dict())
    if shape:
        raise CheckpointError(f"{path} holds another model: " + ", ".join(shape))
    if other:
        keys = ",".join(d.split(" ", 1)[0] for d in other)
        raise CheckpointError(
            f"{path} belongs to another run: " + ", ".join(other) + "; resume with the saved "
            f"values, start a new run with another --out, or pass --allow-change {keys} to "
            f"continue this run with the new values")


def find_resume_checkpoint(root: Path, log=None) -> tuple[Path, dict] | None:
    """The newest checkpoint under `root` that verifies (refusals reported to `log`).

    None when there is no checkpoint at all; `CheckpointError` naming every refusal when
    there are checkpoints but none passes its checks (never silently start again).
    """
    refused = []
    for path in reversed(checkpoints(root)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            refused.append(str(e))
            if log:
                log(f"haillm: refusing checkpoint {e}; trying an older one")
    if refused:
        raise CheckpointError(f"--resume: none of the {len(refused)} checkpoints in {root} "
                              "passes its checks: " + "; ".join(refused))
    return None


def check_resume(cfg: Config) -> tuple[Path, dict] | None:
    """What `--resume` will load (None: nothing to resume, start fresh), checked the way the
    ranks check it: `CheckpointError` if none verifies or it belongs to another run."""
    found = find_resume_checkpoint(Path(cfg.run.out) / "checkpoints")
    if found:
        check_same_run(found[0], found[1], cfg)
    return found
