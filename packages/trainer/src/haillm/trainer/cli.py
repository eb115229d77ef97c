"""Command-line entry points: `haillm-train`, `haillm-generate`, `haillm-plan`, `haillm-prepare`,
`haillm-export`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from haillm.trainer.config import PRESETS, Config, ConfigError, load_config

__all__ = ["build_config", "export_main", "generate_main", "plan_main", "prepare_main",
           "train_main", "train_parser"]


def train_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="haillm-train",
        description="Train a DeepSeek-LLM-architecture model with DP (ZeRO-1) x TP (+SP) x CP x PP.",
        epilog="example: haillm-train --preset tiny --nproc 8 --dp 2 --tp 2 --pp 2",
    )
    ap.add_argument("--config", metavar="FILE.toml", help="TOML file (same sections as "
                    "<out>/config.toml)")
    ap.add_argument("--preset", default=None, help=f"named preset: {', '.join(PRESETS)} "
                    "(default: tiny unless --config is given)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="override any config key (repeatable)")
    ap.add_argument("--dp", type=int, help="data-parallel degree (ZeRO-1 over it)")
    ap.add_argument("--tp", type=int, help="tensor-parallel degree (with sequence parallel)")
    ap.add_argument("--pp", type=int, help="pipeline-parallel degree")
    ap.add_argument("--cp", type=int, help="context-parallel degree (ring attention over the "
                    "sequence; seq_len divisible by 2*cp)")
    ap.add_argument("--microbatches", type=int, help="micro-batches per step and DP rank")
    ap.add_argument("--steps", type=int, help="optimizer steps")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"])
    # checked by the config (one `error:` line, exit 2), like --set parallel.recompute=...
    ap.add_argument("--recompute", metavar="none|selective|full", help="activation "
                    "recomputation: full blocks, or the norms and SwiGLU activation "
                    "(parallel.recompute; parallel.recompute_layers=N: first N per chunk)")
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--nproc", type=int, help="start this many local ranks (torch's elastic "
                    "launcher); default: 1, or the environment under torchrun")
    ap.add_argument("--out", help="run folder (config.toml, metrics.jsonl, tokenizer, weights)")
    ap.add_argument("--save-every", type=int, help="checkpoint every N steps")
    ap.add_argument("--exit-after", type=int, help="stop cleanly after step N")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint "
                    "that verifies (the same run: model, data, seed and optimizer settings "
                    "must match; layout, --steps and the save cadence may change)")
    ap.add_argument("--overwrite", action="store_true", help="if --out holds another run, "
                    "move it aside to <out>.prev-<time> (nothing is deleted) and start afresh")
    ap.add_argument("--init-from", metavar="HF_DIR", help="start from a Hugging Face "
                    "Llama-format folder: its weights (each rank reads only its slices), model "
                    "shape and tokenizer; step 0, fresh optimizer (train.init_from)")
    ap.add_argument("--allow-change", dest="allow_changes", action="append", default=[],
                    metavar="KEY", help="with --resume: let config KEY (e.g. train.lr; or "
                    "'all') differ from the checkpoint's (repeatable)")
    return ap


def build_config(args: argparse.Namespace) -> Config:
    """The resolved config: preset, TOML file, --set, then the dedicated flags."""
    preset = args.preset or (None if args.config else "tiny")
    cfg = load_config(preset, args.config, args.overrides)
    for flag, (section, key) in {
        "dp": ("parallel", "dp"), "tp": ("parallel", "tp"), "pp": ("parallel", "pp"),
        "cp": ("parallel", "cp"),
        "microbatches": ("parallel", "microbatches"), "steps": ("train", "steps"),
        "precision": ("train", "precision"), "device": ("run", "device"), "out": ("run", "out"),
        "recompute": ("parallel", "recompute"),
        "save_every": ("run", "save_every"), "exit_after": ("run", "exit_after"),
    }.items():
        v = getattr(args, flag)
        if v is not None:
            setattr(getattr(cfg, section), key, v)
    if args.init_from is not None:
        cfg.train.init_from = args.init_from
    if cfg.train.init_from:  # the shape comes from its config.json; explicit clashes refused
        from haillm.trainer.hf import apply_init_from, explicit_model_keys

        apply_init_from(cfg, explicit_model_keys(args.config, args.overrides))
    if args.resume:
        cfg.run.resume = True
    if args.allow_changes:
        cfg.run.allow_changes = ",".join(
            k for k in [*cfg.run.allow_changes.split(","), *args.allow_changes] if k.strip())
    for flag in ("dp", "tp", "pp", "cp", "microbatches", "steps", "save_every", "exit_after"):
        v = getattr(args, flag)
        lo = 0 if flag in ("save_every", "exit_after") else 1
        if v is not None and v < lo:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= {lo}, got {v}"
                              + (" (0: only at the end)" if flag == "save_every" else
                                 " (0: run to the end)" if flag == "exit_after" else ""))
    p = cfg.parallel
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    mp = p.cp * p.tp * p.pp  # the ranks of one data-parallel replica
    if args.nproc and args.dp is None and p.dp * mp != args.nproc:
        if args.nproc % mp:
            what = (f"tp*pp = {p.tp}*{p.pp}" if p.cp == 1
                    else f"cp*tp*pp = {p.cp}*{p.tp}*{p.pp}")
            raise ConfigError(f"--nproc {args.nproc} is not divisible by {what}")
        p.dp = args.nproc // mp  # the remaining ranks go to data parallelism
    return cfg


def _fail(msg: str) -> int:
    from haillm.trainer.metrics import end_progress_line

    end_progress_line()
    print(f"haillm-train: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _os_error_text(e: OSError) -> str:
    """`OSError` -> 'Permission denied: /path' (one line, no traceback)."""
    if e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return str(e)


def _exit_code(summary: dict | None) -> int:
    """0, or 128 + the signal of a graceful stop (130 for SIGINT, 143 for SIGTERM)."""
    import signal

    stopped = (summary or {}).get("stopped")
    return 128 + int(getattr(signal, stopped)) if stopped else 0


def _newest(out: Path) -> tuple[str, int] | None:
    from haillm.trainer.checkpoint import latest_checkpoint

    found = latest_checkpoint(out / "checkpoints")
    return (str(found[0]), int(found[1]["step"])) if found else None


def _interrupted(cfg: Config | None, code: int, how: str) -> int:
    """A stop that could not save: say what is kept, exit 128 + signal."""
    from haillm.trainer.metrics import end_progress_line

    end_progress_line()
    nxt = ""
    if cfg is not None:
        found = _newest(Path(cfg.run.out))
        nxt = (f"; the steps since step {found[1]} are lost; continue from {found[0]} with "
               f"--resume" if found else "; no checkpoint was saved")
    print(f"haillm-train: {how}{nxt}", file=sys.stderr, flush=True)
    return code


def _launcher_stopped(err, cfg: Config) -> int:
    """The launcher got SIGINT/SIGTERM and passed it to the ranks, which stop gracefully
    (rank 0 then prints 'stopped at step k; saved ...'). Exit 128 + the signal."""
    import json
    import signal

    sig = int(getattr(err, "sigval", signal.SIGTERM))
    out = Path(cfg.run.out)
    found, logged = _newest(out), 0
    try:
        for ln in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            logged = max(logged, int(json.loads(ln).get("step", 0)))
    except (OSError, ValueError):
        pass
    if found is None or found[1] < logged:  # the ranks did not get to save
        return _interrupted(cfg, 128 + sig, f"stopped by {signal.Signals(sig).name} before "
                            "the ranks could save")
    return 128 + sig


def train_main(argv: list[str] | None = None) -> int:
    """`haillm-train`: see `--help`.

    Exit codes: 0 done; 2 bad input or a failed run (one `error:` line); 130 / 143 stopped by
    SIGINT / SIGTERM (gracefully: a checkpoint of the last step was saved).
    """
    from haillm.trainer.checkpoint import CheckpointError
    from haillm.trainer.launch import init_from_env, launch_local, under_torchrun

    args = train_parser().parse_args(argv)
    cfg = None
    try:
        cfg = build_config(args)
        from haillm.trainer.train import check_device, train

        if under_torchrun():
            import os

            cfg.validate(int(os.environ["WORLD_SIZE"]))
            check_device(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
            init_from_env(cfg.run.device)
            return _exit_code(train(cfg, overwrite=args.overwrite))
        nproc = args.nproc or 1
        cfg.validate(nproc)
        check_device(cfg, nproc)  # before tokenising: that can take a while
        from haillm.trainer.runfolder import check_resume, prepare_run_folder

        prepare_run_folder(cfg, log=lambda s: print(s, file=sys.stderr, flush=True),
                           overwrite=args.overwrite)
        if cfg.run.resume:
            check_resume(cfg)  # refuse a damaged or foreign run before any rank starts
        # tokenise once here, so that the ranks only read the cache (and a bad corpus path
        # fails before any rank starts)
        from haillm.trainer.data import build_dataset

        build_dataset(cfg.data, cfg.model.vocab_size, cfg.model.seq_len, Path(cfg.run.out))
        if nproc == 1:
            return _exit_code(train(cfg))
        launch_local(cfg, nproc)
    except (ConfigError, CheckpointError, NotImplementedError, FloatingPointError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(_os_error_text(e))
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: at once
        return _interrupted(cfg, 130, "interrupted: stopped at once")
    except Exception as e:
        name = type(e).__name__
        if name == "SignalException" and cfg is not None:  # the launcher got SIGINT/SIGTERM
            return _launcher_stopped(e, cfg)
        if name != "ChildFailedError":  # a rank died: torch's launcher stopped the others
            raise
        return _fail(_rank_failure_message(e, Path(cfg.run.out)))
    return 0


def _rank_failure_message(err, out: Path) -> str:
    """`ChildFailedError` -> which rank died and how, and how to continue."""
    import signal

    from haillm.trainer.checkpoint import latest_checkpoint

    parts = []
    for rank, f in sorted(getattr(err, "failures", {}).items()):
        code = getattr(f, "exitcode", None)
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
            msg = (getattr(f, "error_file_data", None) or {}).get("message") or \
                getattr(f, "message", "")
            if isinstance(msg, dict):  # the rank's recorded exception: {"message": "Type: text"}
                msg = msg.get("message", "")
            msg = str(msg or "").strip()
            if msg and "To enable traceback" not in msg and msg != "<NONE>":
                how += f" ({msg.splitlines()[-1]})"
            else:
                how += " (its traceback is printed above)"
        parts.append(f"rank {rank} (pid {getattr(f, 'pid', '?')}) {how}")
    found = latest_checkpoint(out / "checkpoints")
    nxt = (f"continue from {found[0]} (step {found[1]['step']}) with --resume" if found else
           "no complete checkpoint to resume from (use --save-every N)")
    return "; ".join(parts or ["a rank failed"]) + f"; the launcher stopped the run; {nxt}"


def generate_main(argv: list[str] | None = None) -> int:
    """`haillm-generate`: sample from a checkpoint or a safetensors export (see `--help`)."""
    from haillm.trainer.checkpoint import CheckpointError
    from haillm.trainer.generate import run_generate

    try:
        print(run_generate(argv))
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"haillm-generate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"haillm-generate: error: {_os_error_text(e)}", file=sys.stderr)
        return 2
    return 0


def plan_main(argv: list[str] | None = None) -> int:
    """`haillm-plan`: per-rank memory and FLOPs of a preset in a layout (see `--help`)."""
    from haillm.trainer.plan import run_plan

    try:
        print(run_plan(argv))
    except ConfigError as e:
        print(f"haillm-plan: error: {e}", file=sys.stderr)
        return 2
    return 0


def prepare_main(argv: list[str] | None = None) -> int:
    """`haillm-prepare`: tokenise a corpus into .bin shards + an index (see `--help`)."""
    from haillm.trainer.prepare import run_prepare

    try:
        run_prepare(argv)
    except ConfigError as e:
        print(f"haillm-prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


def export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="haillm-export", description="Write a checkpoint (any training layout) as a "
        "Hugging Face LlamaForCausalLM folder: config.json, safetensors shards + index, "
        "generation_config.json, tokenizer files.",
        epilog="example: haillm-export --checkpoint runs/tiny --hf hf/tiny")
    ap.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint folder, "
                    "or a run folder (its newest complete checkpoint)")
    ap.add_argument("--hf", required=True, metavar="OUT", help="the folder to write")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="fp32: the master weights exactly (default); bf16: rounded to nearest")
    ap.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest "
                    "safetensors shard: bytes, or with a unit (KB, MB, GB; decimal) (default 5GB)")
    return ap


def _size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as Hugging Face's max_shard_size)."""
    t = text.strip().upper()
    for unit, mul in (("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("B", 1)):
        if t.endswith(unit):
            t, m = t[:-len(unit)], mul
            break
    else:
        m = 1
    try:
        n = int(float(t) * m)
    except ValueError:
        raise ConfigError(f"--max-shard-size: cannot read {text!r} as a size (e.g. 5GB, "
                          "200MB, 1000000)") from None
    if n < 1:
        raise ConfigError(f"--max-shard-size must be at least 1 byte, got {text!r}")
    return n


def export_main(argv: list[str] | None = None) -> int:
    """`haillm-export`: a checkpoint -> a Hugging Face Llama folder (see `--help`)."""
    from haillm.trainer.checkpoint import CheckpointError
    from haillm.trainer.hf import export_hf

    a = export_parser().parse_args(argv)
    say = lambda s: print(f"haillm-export: {s}", file=sys.stderr, flush=True)
    try:
        if not Path(a.checkpoint).exists():
            raise ConfigError(f"--checkpoint {a.checkpoint!r}: no such file or folder")
        out = export_hf(a.checkpoint, a.hf, dtype=a.dtype, max_shard_size=_size(a.max_shard_size),
                        log=say)
    except (ConfigError, CheckpointError) as e:
        print(f"haillm-export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"haillm-export: error: {_os_error_text(e)}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
