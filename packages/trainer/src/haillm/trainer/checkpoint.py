"""Checkpoints that survive faults and changes of layout (`torch.distributed.checkpoint`).

One checkpoint is a folder `<out>/checkpoints/step_00000040/`:

* the tensors, written by `torch.distributed.checkpoint` (DCP: one `.distcp` file per writing
  rank and a `.metadata` index): for every parameter of the model, under its *logical* name
  and *global* shape (`master/layers.3.attn.wq.weight`, `exp_avg/...`, `exp_avg_sq/...`):
  the fp32 master weights and the two Adam moments, **gathered to full on save** over TP
  (the shard plan's `Shard.gather`) and over DP (the ZeRO-1 shards, over dp x cp under
  context parallelism). The (dp 0, cp 0, tp 0) rank of every pipeline stage contributes its
  stage's tensors, so the stages write in parallel. Nothing depends on cp: the CP ranks hold
  the same parameters (only the tokens are split), so a run resumes in any cp. The
  training weights are the master weights cast to the training precision (which is exactly
  what the optimizer writes after each step), so they need no copy of their own.
* `trainer_state.pt`: optimizer step count, data position (the sampler), loss scaler, step;
  `rng/rank_00003.pt`: each rank's RNG states (used when the layout is unchanged).
* `manifest.json`, written last: step, layout, the resolved config, and the size and SHA-256
  of every file.

Because the saved form does not depend on the layout, *resharding on load* is slicing: each
rank asks DCP for the full tensors of its stage's layers and keeps its TP slice and DP shard
(`local_tensors`, the shard plan's `Shard.local`). What the real ones add (torchtitan, Megatron's dist-ckpt): each
rank saves only its own shard as a DTensor/ShardedTensor piece (no gather, no full copy in
memory) and DCP reshards piece by piece on load.

Atomicity: the folder is written as `.tmp-step_N`, every file is fsynced, the manifest comes
last and only then is the folder renamed (an atomic `rename` on POSIX) to `step_N`. A crash
while saving leaves a `.tmp-*` folder that no loader looks at; the older checkpoints are
untouched (pruning to the last `keep` happens after the rename). On load the manifest's
checksums are verified: a missing, truncated or corrupted file is refused with a
`CheckpointError` naming it, and `--resume` falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from haillm.trainer.metrics import end_progress_line
from haillm.trainer.shard_plan import param_specs

__all__ = ["CheckpointError", "Checkpointer", "checkpoints", "latest_checkpoint",
           "load_logical", "local_tensors", "logical_tensors", "verify_checkpoint"]

FORMAT = "haillm-checkpoint-v2"
"""v2: parameters under `DeepSeekLM`'s names (merged `attn.wqkv`, `mlp.w_gate_up`); v1 stored
Q, K, V, gate and up separately."""
KEYS = ("master", "exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupted or does not fit the run."""


# ------------------------------------------------------------------------------ files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def checkpoints(root: Path) -> list[Path]:
    """The renamed (candidate complete) checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def verify_checkpoint(path: Path) -> dict:
    """Return the manifest of a complete, intact checkpoint; else raise `CheckpointError`."""
    path = Path(path)
    man = path / "manifest.json"
    if not man.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no manifest.json)")
    try:
        manifest = json.loads(man.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: manifest.json is not a JSON object")
    if manifest.get("format") != FORMAT:
        if manifest.get("format") == "haillm-checkpoint-v1":
            raise CheckpointError(f"{path}: format haillm-checkpoint-v1 (separate Q, K, V, "
                                  "gate and up weights) is from an older haillm; this one "
                                  f"reads {FORMAT}")
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not isinstance(manifest.get("step"), int) \
            or not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{path}: manifest.json lacks its step, config or file list")
    for rel, info in files.items():
        if not isinstance(info, dict) or "bytes" not in info or "sha256" not in info:
            raise CheckpointError(f"{path}: manifest.json has no size or checksum for {rel}")
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: missing file {rel} (the manifest lists it)")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: {rel} has {size} bytes, the manifest says "
                                  f"{info['bytes']} (truncated or overwritten)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch in {rel} (corrupted file)")
    return manifest


def latest_checkpoint(root: Path, *, log=None) -> tuple[Path, dict] | None:
    """The newest checkpoint under `root` that verifies; refused ones are reported to `log`."""
    for path in reversed(checkpoints(root)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            if log:
                log(f"haillm: refusing checkpoint {e}; trying an older one")
    return None


def _resolve(path: Path, log=None) -> tuple[Path, dict]:
    """A checkpoint folder, or a run folder / its `checkpoints/` (newest complete one)."""
    path = Path(path)
    log = log or (lambda s: print(s, file=sys.stderr))
    if (path / "manifest.json").is_file() or path.name.startswith("step_"):
        return path, verify_checkpoint(path)
    refused = []
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root, log=lambda s: (refused.append(s), log(s)))
        if found:
            return found
    raise CheckpointError(f"no complete checkpoint under {path}" +
                          (f" ({len(refused)} refused, see above)" if refused else ""))


def load_logical(path: Path, keys: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
                 *, prefix: str = "master/", log=None, verify: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read full logical tensors from a checkpoint in one process (no process group needed).

    Args:
        path: a checkpoint folder, or a run folder (its newest complete checkpoint).
        keys: `{logical name: (shape, dtype)}` to read; default every key under `prefix`.
        log: called with each refused checkpoint and with the one used (default: refusals
            to stderr).
        verify: check the manifest's sizes and checksums; False for a checkpoint folder
            verified already (a streaming reader calls this once per group of keys).
    Returns:
        (`{name: tensor}` without the prefix, the manifest).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    if not verify and (Path(path) / "manifest.json").is_file():
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    else:
        path, manifest = _resolve(path, log)
    if log:
        log(f"using checkpoint {path} (step {manifest['step']})")
    try:
        if keys is None:
            meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
            keys = {k[len(prefix):]: (tuple(v.size), v.properties.dtype)
                    for k, v in meta.items() if k.startswith(prefix)}
        sd = {prefix + k: torch.empty(shape, dtype=dt) for k, (shape, dt) in keys.items()}
        with _quiet_single_process():
            dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # verified files that DCP still cannot read (another format)
        raise CheckpointError(f"{path}: the tensors cannot be read "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0]})") from e
    return {k[len(prefix):]: v for k, v in sd.items()}, manifest


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' when there is none: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _trim_metrics(out: Path, step: int) -> None:
    """Drop `metrics.jsonl` records after `step` (logged by a run that died before saving
    them), so that the resumed run appends each step exactly once."""
    f = out / "metrics.jsonl"
    if not f.is_file():
        return
    keep = [ln for ln in f.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step]
    f.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


# ------------------------------------------------------------------------------ layout
@torch.no_grad()
def logical_tensors(chunks, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's per-parameter tensors (weights, masters, moments; named as the chunks'
    parameters) -> the full tensors, gathered over TP by the shard plan. Collective over TP:
    every TP rank of a stage calls it with the same names."""
    specs, g = param_specs(chunks.local.cfg), chunks.dims.tp_group
    return {n: specs[n].shard.gather(t.detach(), g) if chunks.dims.tp > 1 else t.detach()
            for n, t in tensors.items()}


def local_tensors(chunks, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors -> this rank's slices (the inverse of `logical_tensors`; no communication)."""
    specs, dims = param_specs(chunks.local.cfg), chunks.dims
    return {n: specs[n].shard.local(t, dims.tp_rank, dims.tp) for n, t in full.items()}


# ------------------------------------------------------------------------------ optimizer
@torch.no_grad()
def _optimizer_full_state(opt) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """`{master|exp_avg|exp_avg_sq: {param name: fp32 tensor}}` (collective over DP).

    `haillm.zero`'s `Zero1AdamW.full_state_dict` gathers its ZeRO-1 shards into per-parameter
    tensors (named as the rank's parameters: the shard plan's names), independent of DP.
    """
    full = opt.opt.full_state_dict()
    return {k: full[k] for k in KEYS}, {"num_steps": full["num_steps"],
                                         "loss_scaler": full.get("loss_scaler")}


@torch.no_grad()
def _optimizer_load_full(opt, state: dict[str, dict[str, torch.Tensor]], extra: dict):
    """Each rank keeps its DP shard of the full state; parameters := master weights (exactly
    what the optimizer writes after every step)."""
    opt.opt.load_full_state_dict({**state, "num_steps": extra["num_steps"],
                                  "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                   for g in opt.opt.param_groups],
                                  "loss_scaler": extra.get("loss_scaler")})


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])


# ------------------------------------------------------------------------------ the object
class Checkpointer:
    """Saves and restores one rank's share of the run (every method is collective).

    Args:
        cfg: the run's `Config` (`run.out`, `run.save_every`, `run.resume`, layout).
        chunks: `parallelize`'s `ModelChunks` of this rank (with its `dims`).
        opt: the trainer's `Optimizer` (its `Zero1AdamW` holds masters, moments, loss scale).
        sampler: the data sampler.
        keep: how many complete checkpoints to keep (older ones are deleted).
        stream: where rank 0 reports saves and loads (default stderr).
    """

    def __init__(self, cfg, chunks, opt, sampler, *, keep: int = 3, stream=None):
        self.cfg, self.chunks, self.dims, self.opt = cfg, chunks, chunks.dims, opt
        if keep < 0:
            raise ValueError(f"run.keep_checkpoints must be >= 0 (0: keep all), got {keep}")
        self.sampler, self.keep = sampler, keep
        self.root = Path(cfg.run.out) / "checkpoints"
        self.log = lambda s: (end_progress_line(), print(s, file=stream or sys.stderr,
                                                          flush=True))
        dims = self.dims
        # one writer per stage (the CP ranks hold the same full tensors: one writes them)
        self.writer = dims.dp_rank == 0 and dims.tp_rank == 0 and dims.cp_rank == 0
        pids = Path(cfg.run.out) / "pids"  # so that operators (and tests) can find a rank
        pids.mkdir(parents=True, exist_ok=True)
        (pids / f"rank_{dims.rank:05d}").write_text(str(os.getpid()))

    def _barrier(self):
        if dist.is_initialized() and self.dims.world_size > 1:
            dist.barrier()

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"dp": p.dp, "tp": p.tp, "pp": p.pp, "cp": p.cp, "world": self.dims.world_size,
                "microbatches": p.microbatches, "sequence_parallel": p.sequence_parallel}

    def should_save(self, step: int, last: int) -> bool:
        k = self.cfg.run.save_every
        return step == last or (k > 0 and step % k == 0)

    # ---------------------------------------------------------------- save
    def save(self, step: int) -> Path:
        """Write checkpoint `step` (collective). Returns its final folder.

        A full disk raises `CheckpointError('no space left on device while saving ...')`;
        the older checkpoints are untouched (the partial `.tmp-*` folder is never read).
        """
        name = f"step_{step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        try:
            return self._save(step, final, tmp)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if not (_disk_full(e) or _no_room_left(self.root)):
                if isinstance(e, Exception):
                    raise
                cause = (str(e).strip().splitlines() or [type(e).__name__])[-1]  # the root
                raise CheckpointError(f"saving {final} failed ({cause}); the partial "
                                      f"{tmp.name} is never read") from e
            prev = [p.name for p in checkpoints(self.root) if p != final]
            raise CheckpointError(
                f"no space left on device while saving {final} (the partial {tmp.name} is "
                f"never read; " + (f"the previous checkpoints {', '.join(prev)} are intact"
                                   if prev else "no earlier checkpoint") +
                "); free some space and continue with --resume") from e

    def _save(self, step: int, final: Path, tmp: Path) -> Path:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        if self.dims.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):  # left by a crash while saving
                shutil.rmtree(stale)  # never complete, never read
            tmp.mkdir()
            (tmp / "rng").mkdir()
        self._barrier()
        state, extra = _optimizer_full_state(self.opt)
        sd: dict[str, torch.Tensor] = {}
        for key in KEYS:
            full = logical_tensors(self.chunks, state[key])  # collective over TP
            if self.writer:
                sd.update({f"{key}/{n}": t.cpu() for n, t in full.items()})
        with _quiet_single_process():
            dcp.save(sd, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        # every rank makes the folder it writes into (a node without the shared filesystem
        # of rank 0 would not see rank 0's mkdir)
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        _torch_save(_rng_state(), tmp / "rng" / f"rank_{self.dims.rank:05d}.pt")
        if self.dims.rank == 0:
            ts = {"step": step, "sampler": self.sampler.state_dict(), "optimizer": extra}
            _torch_save(ts, tmp / "trainer_state.pt")
        self._barrier()
        if self.dims.rank == 0:
            _fault_point(step, tmp)
            _fsync_tree(tmp)
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"format": FORMAT, "step": step, "layout": self._layout(),
                        "precision": self.cfg.train.precision, "config": self.cfg.to_dict(),
                        "params_form": "full logical tensors, gathered over TP and DP on save",
                        "torch": torch.__version__, "time": time.time(), "files": files}
            with open(tmp / "manifest.json", "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # a re-run of the same step: replace it only now
                shutil.rmtree(final)
            os.rename(tmp, final)
            # keep the newest `keep` up to this step; never count a later step (one that a
            # resume from an older checkpoint left behind) as newer than this one
            upto = [p for p in checkpoints(self.root) if int(p.name.split("_")[1]) <= step]
            for old in upto[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            self.log(f"haillm: saved checkpoint {final} ({time.perf_counter() - t0:.1f} s)")
        self._barrier()
        return final

    # ---------------------------------------------------------------- load
    def resume(self) -> int:
        """Load the newest complete checkpoint (collective). Returns its step (0: none).

        Raises `CheckpointError` when checkpoints exist but none verifies (naming each
        refusal), or when the newest one belongs to another model or run.
        """
        from haillm.trainer.runfolder import find_resume_checkpoint

        choice: list = [None, None]
        if self.dims.rank == 0:
            try:
                found = find_resume_checkpoint(self.root, log=self.log)
                choice = [str(found[0]) if found else None, None]
            except CheckpointError as e:
                choice = [None, str(e)]
        if dist.is_initialized() and self.dims.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        if choice[1] is not None:
            raise CheckpointError(choice[1])
        if choice[0] is None:
            if self.dims.rank == 0:
                self.log(f"haillm: --resume: no checkpoint in {self.root}; starting fresh "
                         "from step 0")
                _trim_metrics(Path(self.cfg.run.out), 0)
            self._barrier()
            return 0
        return self.load(Path(choice[0]))

    def load(self, path: Path) -> int:
        """Load checkpoint `path` into this rank, resharding to the current layout."""
        import torch.distributed.checkpoint as dcp

        from haillm.trainer.runfolder import check_same_run

        manifest = json.loads((Path(path) / "manifest.json").read_text())
        check_same_run(Path(path), manifest, self.cfg)
        specs = param_specs(self.cfg.model)
        shapes = {n: specs[n].shape for n, _ in self.chunks.local.named_parameters()}
        sd = {f"{k}/{n}": torch.empty(s, dtype=torch.float32) for k in KEYS
              for n, s in shapes.items()}
        with _quiet_single_process():
            dcp.load(sd, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        dev = next(self.chunks.local.parameters()).device
        state = {k: {n: t.to(dev) for n, t in local_tensors(
            self.chunks, {n: sd[f"{k}/{n}"] for n in shapes}).items()} for k in KEYS}
        ts = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
        _optimizer_load_full(self.opt, state, ts["optimizer"])
        self.sampler.load_state_dict(ts["sampler"])
        # a manifest written before context parallelism existed has no "cp": it was 1
        same = {"cp": 1, **manifest["layout"]} == self._layout()
        rng = Path(path) / "rng" / f"rank_{self.dims.rank:05d}.pt"
        if same and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        if self.dims.rank == 0:
            _trim_metrics(Path(self.cfg.run.out), int(ts["step"]))
            old = {"cp": 1, **manifest["layout"]}
            how = "same layout" if same else (f"resharded from dp={old['dp']} cp={old['cp']} "
                                              f"tp={old['tp']} pp={old['pp']}")
            self.log(f"haillm: resumed from {path} at step {ts['step']} ({how})")
        self._barrier()
        return int(ts["step"])


def _fault_point(step: int, tmp: Path) -> None:
    """Test-only hook, a no-op: called on rank 0 after every file of checkpoint `step` is
    written into `tmp`, before the fsync and the manifest. Tests monkeypatch it to raise (a
    full disk or a crash at the worst time); production code never changes it."""


def _torch_save(obj, path: Path) -> None:
    """`torch.save` through a Python file write, so that a full disk raises a plain
    `OSError(ENOSPC)` (the C++ zip writer can abort the process instead)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def _no_room_left(root: Path, margin: int = 1 << 20) -> bool:
    """Whether the filesystem of `root` has less than `margin` bytes left: torch's zip writer
    reports a full disk as 'unexpected pos ...', not as ENOSPC."""
    try:
        st = os.statvfs(root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def _disk_full(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it, or a DCP rank failure inside it) is a full disk."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        for sub in (getattr(e, "failures", None) or {}).values():  # DCP's CheckpointException
            if isinstance(sub, BaseException) and _disk_full(sub):
                return True
        e = e.__cause__ or e.__context__
    return False
