"""Record when each collective and each GEMM starts and ends (for the overlap benchmark).

    with Tracer() as tr:
        loss.backward()
    tr.events   # [Event(kind="comm", name="all_reduce", start=..., end=..., ...), ...]

The active tracer lives in a `contextvars.ContextVar` (per thread / task, `None` by default), so
nothing is recorded, and nothing costs more than one lookup, unless you ask for it. The
autograd engine runs CPU backward passes on the calling thread, so backward events are seen.

An asynchronous collective's *end* is recorded by a callback on its `Work`'s future, which
fires in the communication thread the moment the data has arrived: that is what lets us
measure how much communication was hidden behind the GEMMs issued meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "Tracer", "current_tracer", "span", "trace_work"]

_CURRENT: ContextVar[Tracer | None] = ContextVar("haillm_parallel_tracer", default=None)


@dataclass
class Event:
    """One recorded interval; times in seconds since the tracer started."""

    kind: str  # "comm" or "compute"
    name: str
    start: float
    end: float
    is_async: bool = False

    @property
    def duration(self) -> float:
        return self.end - self.start


class Tracer:
    """Collects `Event`s while active (`with Tracer() as tr: ...`)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._token: Any = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, kind: str, name: str, start: float, end: float, is_async: bool = False) -> None:
        with self._lock:
            self.events.append(Event(kind, name, start, end, is_async))

    def __enter__(self) -> Tracer:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _CURRENT.reset(self._token)


def current_tracer() -> Tracer | None:
    """The active `Tracer`, or None."""
    return _CURRENT.get()


@contextmanager
def span(kind: str, name: str) -> Iterator[None]:
    """Record the enclosed block as one event of the active tracer (no-op without one)."""
    tr = _CURRENT.get()
    if tr is None:
        yield
        return
    start = tr.now()
    try:
        yield
    finally:
        tr.record(kind, name, start, tr.now())


class _TimedWork:
    """A `Work` wrapper that records the collective's end when `wait()` returns."""

    def __init__(self, work: Any, tr: Tracer, name: str, start: float) -> None:
        self._work, self._tr, self._name, self._start = work, tr, name, start

    def wait(self, timeout: Any = None) -> Any:
        out = self._work.wait()
        self._tr.record("comm", self._name, self._start, self._tr.now(), True)
        return out

    def is_completed(self) -> bool:
        return self._work.is_completed()


def trace_work(work: Any, name: str, start: float | None) -> Any:
    """Record an asynchronous collective from `start` until its future completes.

    Returns `work`, or a wrapper recording the end at `wait()` when it has no future.
    """
    tr = _CURRENT.get()
    if tr is None or start is None:
        return work
    try:
        fut = work.get_future()
    except Exception:  # noqa: BLE001 - some backends/ops have no future
        fut = None
    if fut is None:
        return _TimedWork(work, tr, name, start)
    fut.add_done_callback(lambda _f: tr.record("comm", name, start, tr.now(), True))
    return work
