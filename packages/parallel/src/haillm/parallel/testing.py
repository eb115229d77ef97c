"""Run a function on N local ranks: the harness behind every distributed test and tutorial.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, joins them into one
process group (gloo by default, over a free TCP port on 127.0.0.1), calls `fn(*args, **kwargs)`
on each rank and returns the per-rank results in rank order. A rank that raises makes the call
raise `RankFailure` carrying that rank's own traceback; a rank that hangs or dies without a
word makes it raise once `timeout` seconds have passed, so a deadlock fails a test instead of
blocking CI.

Two start methods:

* ``"spawn"`` (default): fresh interpreters; `fn` must be importable (defined at module level
  in a file), like everything handed to `torch.multiprocessing.spawn`.
* ``"fork"``: the children inherit the parent's memory, so `fn` may be defined in a notebook, a
  REPL or a documentation page. Each child limits itself to one intra-op thread (as
  `DataLoader` workers do), which keeps OpenMP safe after a fork.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankFailure", "free_port", "run_distributed"]


class RankFailure(RuntimeError):
    """One or more ranks raised, died or hung; the message holds each rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    # torch.save rather than the queue's pickler: tensors then travel by value, not as
    # shared-memory handles that die with the child process.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    threads: int,
    results: Any,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        out = fn(*args, **kwargs)
        payload = ("ok", _dumps(out))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        payload = ("error", traceback.format_exc())
    try:
        results.put((rank, *payload))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 120.0,
    start_method: str = "spawn",
    threads: int = 1,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on `world_size` ranks of a fresh process group.

    Inside `fn`, ``torch.distributed`` is initialised: use ``dist.get_rank()`` and friends.

    Args:
        fn: the per-rank function; its return value (tensors included) comes back by value.
        world_size: number of ranks (≥ 1).
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        timeout: seconds before a silent rank counts as hung; also the collectives' timeout.
        start_method: ``"spawn"`` or ``"fork"`` (see the module docstring).
        threads: intra-op threads per rank (1 keeps N ranks from oversubscribing the cores).

    Returns:
        ``[result_of_rank_0, ..., result_of_rank_{world_size-1}]``.

    Raises:
        RankFailure: a rank raised (its traceback is in the message), died or hung.
    """
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be >= 1")
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method must be 'spawn', 'fork' or 'forkserver', got {start_method!r}")
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, backend, timeout, threads, results, fn, args, kwargs),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()

    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout + 30.0  # startup (imports) on top of the op timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.5)
                outcomes[rank] = (status, payload)
                if status == "error":
                    # Give the others a moment to report their own errors (often the root cause
                    # is on another rank), then stop waiting for ranks stuck in collectives.
                    grace = time.monotonic() + 3.0
                    while len(outcomes) < world_size and time.monotonic() < grace:
                        try:
                            r2, s2, p2 = results.get(timeout=0.2)
                            outcomes[r2] = (s2, p2)
                        except queue_mod.Empty:
                            pass
                    break
                continue
            except queue_mod.Empty:
                pass
            dead = [
                r for r, p in enumerate(procs)
                if r not in outcomes and p.exitcode is not None
            ]
            if dead:
                # A process may exit right after putting its result: drain once more.
                time.sleep(0.5)
                while True:
                    try:
                        rank, status, payload = results.get_nowait()
                        outcomes[rank] = (status, payload)
                    except queue_mod.Empty:
                        break
                dead = [r for r in dead if r not in outcomes]
                if dead:
                    for r in dead:
                        outcomes[r] = (
                            "error",
                            f"rank {r} died without reporting (exit code {procs[r].exitcode})",
                        )
                    break
            if time.monotonic() > deadline:
                break
    finally:
        for r, p in enumerate(procs):
            if r not in outcomes and p.exitcode is not None:
                outcomes[r] = ("error", f"rank {r} died without reporting (exit code {p.exitcode})")
        for p in procs:
            p.join(timeout=5.0 if len(outcomes) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()

    errors = [(r, msg) for r, (s, msg) in sorted(outcomes.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in outcomes]
    if errors or missing:
        parts = [f"--- rank {r} raised ---\n{msg}" for r, msg in errors]
        if missing:
            parts.append(
                f"--- ranks {missing} did not finish within {timeout:.0f}s "
                "(hung, most likely waiting in a collective) ---"
            )
        raise RankFailure(
            f"{len(errors)} of {world_size} ranks failed"
            + (f", {len(missing)} hung" if missing else "")
            + "\n" + "\n".join(parts)
        )
    return [torch.load(io.BytesIO(outcomes[r][1]), weights_only=False) for r in range(world_size)]
