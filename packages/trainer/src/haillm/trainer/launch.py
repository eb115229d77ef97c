"""Starting the ranks: under `torchrun` from the environment, or `--nproc N` ourselves.

* Under `torchrun` (single or multi-node) the environment holds RANK, WORLD_SIZE,
  MASTER_ADDR/PORT and LOCAL_RANK: we only join the process group.
* `--nproc N` starts N local ranks with torch's own elastic launcher
  (`torch.distributed.launcher.api.elastic_launch`, the engine behind `torchrun`): same
  rendezvous, same environment, same failure handling (a rank that dies stops the others).

Backend: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
import socket
import uuid

import torch
import torch.distributed as dist

from haillm.trainer.config import Config

__all__ = ["SHUTDOWN_TIMEOUT_S", "init_from_env", "launch_local", "under_torchrun"]

SHUTDOWN_TIMEOUT_S = 300
"""On SIGINT/SIGTERM the launcher passes the signal to the ranks and waits this long for them
to finish the step and save a checkpoint (then SIGKILL)."""


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str) -> None:
    """Join the process group described by the environment (no-op if already joined)."""
    if dist.is_initialized() or not under_torchrun():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if device == "cpu":
        # share the cores: N ranks x T threads should not exceed the machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(cfg_dict: dict) -> dict | None:
    from haillm.trainer.config import apply_dict
    from haillm.trainer.train import train

    cfg = apply_dict(Config(), cfg_dict, source="launcher")
    init_from_env(cfg.run.device)
    try:
        summary = train(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, quietly (the launcher reports)
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.get("stopped"):
        # a graceful stop: the launcher, which passed the signal on, no longer collects
        # return values (torch's worker would wait for it until killed): exit now
        import signal
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + int(getattr(signal, summary["stopped"])))
    return summary if int(os.environ.get("RANK", 0)) == 0 else None


def launch_local(cfg: Config, nproc: int) -> dict | None:
    """Run `train(cfg)` on `nproc` local ranks through torch's elastic launcher.

    Returns rank 0's summary. A failing rank raises `ChildFailedError` naming it.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lc = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"haillm-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
        monitor_interval=0.5, start_method="spawn",
    )
    if hasattr(lc, "shutdown_timeout"):  # torch >= 2.10: time to finish a step and save
        lc.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    import signal

    sigs = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
            if hasattr(signal, n)]
    saved = {s: signal.getsignal(s) for s in sigs}  # torch's agent installs its own
    try:
        results = elastic_launch(lc, _rank_main)(cfg.to_dict())
    finally:
        for s, h in saved.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except (ValueError, OSError):  # not the main thread
                pass
    return results.get(0)
