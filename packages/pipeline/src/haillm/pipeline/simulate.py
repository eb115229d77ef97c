"""Event simulation of a pipeline schedule, and the `Timeline` it (or a real run) produces.

`simulate` plays every stage's action list against the point-to-point dependencies of a
pipeline and returns when each action starts and ends. It is a *list-scheduling* simulation:
each stage runs its actions strictly in order, and an action starts as soon as the stage is
free and its inputs have arrived. Dependencies (virtual stage ``q = chunk * p + stage``, ``Q =
v * p`` virtual stages in all):

* ``F(mb)`` on virtual stage ``q > 0`` needs ``F(mb)`` on ``q - 1`` (its input activation). For
  interleaved schedules this includes the wrap-around: chunk ``c`` on the last stage feeds
  chunk ``c + 1`` on stage 0.
* ``B(mb)`` on ``q < Q - 1`` needs ``B(mb)`` on ``q + 1`` (the gradient of its output).
* ``B(mb)`` on any ``q`` needs its own ``F(mb)`` (guaranteed by the stage order).

**Cost convention.** ``forward_time`` / ``backward_time`` are the costs of one micro-batch
through one *whole stage*; with ``v`` chunks per stage each chunk costs ``1/v`` of that. With
this convention and free communication, the total idle time of 1F1B (and GPipe) is exactly
``(p - 1) * (forward_time + backward_time)`` per stage, so the bubble fraction (idle time over
``p x makespan``) is ``(p - 1) / (m + p - 1)`` for *any* forward/backward ratio, and
``(p - 1) / (v * m + p - 1)`` for interleaved 1F1B; the tests check both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .schedules import Action, validate_schedules

__all__ = ["OpRecord", "Timeline", "simulate"]


@dataclass(frozen=True)
class OpRecord:
    """One executed (or simulated) action: ``stage`` ran ``action`` from ``start`` to ``end``."""

    stage: int
    action: Action
    start: float
    end: float


@dataclass
class Timeline:
    """What each stage did and when: from `simulate` or from a real run's timestamps.

    Attributes:
        ops: every action of every stage with its start/end time.
        num_stages: ``p``.
    """

    ops: list[OpRecord]
    num_stages: int
    meta: dict = field(default_factory=dict)

    def stage_ops(self, stage: int) -> list[OpRecord]:
        """The ops of one stage, in start order."""
        return sorted((o for o in self.ops if o.stage == stage), key=lambda o: o.start)

    @property
    def num_chunks(self) -> int:
        return 1 + max((o.action.chunk for o in self.ops), default=0)

    @property
    def num_microbatches(self) -> int:
        return 1 + max((o.action.microbatch for o in self.ops), default=-1)

    @property
    def start(self) -> float:
        return min((o.start for o in self.ops), default=0.0)

    @property
    def makespan(self) -> float:
        """Time from the first action's start to the last action's end (any stage)."""
        return max((o.end for o in self.ops), default=0.0) - self.start

    def busy(self, stage: int) -> float:
        """Total time ``stage`` spent computing."""
        return sum(o.end - o.start for o in self.ops if o.stage == stage)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the pipeline: ``1 - sum_s busy(s) / (p * makespan)``."""
        total = self.num_stages * self.makespan
        if total <= 0:
            return 0.0
        return 1.0 - sum(self.busy(s) for s in range(self.num_stages)) / total

    @property
    def peak_inflight(self) -> list[int]:
        """Per stage, the peak number of (micro-batch, chunk) activations alive at once.

        An activation is alive from the start of its forward to the end of its backward. For
        ``v = 1`` this is the number of micro-batches in flight (the activation memory of the
        stage, in units of one micro-batch). In a forward-only timeline (no backward at all,
        `schedule_forward_only`) nothing waits for a backward: an activation lives only while
        its forward runs, so the peak is 1 on every stage that ran something.
        """
        if not any(o.action.kind == "B" for o in self.ops):
            return [min(1, len(self.stage_ops(s))) for s in range(self.num_stages)]
        peaks = []
        for s in range(self.num_stages):
            alive = peak = 0
            for o in self.stage_ops(s):
                alive += 1 if o.action.kind == "F" else -1
                peak = max(peak, alive)
            peaks.append(peak)
        return peaks

    @property
    def peak_activations(self) -> list[float]:
        """`peak_inflight` in units of one micro-batch through a whole stage (divided by ``v``)."""
        return [k / self.num_chunks for k in self.peak_inflight]

    def find(self, stage: int, kind: str, microbatch: int, chunk: int = 0) -> OpRecord:
        """The record of one action (raises ``KeyError`` if it never ran)."""
        a = Action(kind, microbatch, chunk)  # type: ignore[arg-type]
        for o in self.ops:
            if o.stage == stage and o.action == a:
                return o
        raise KeyError(f"stage {stage} never ran {a}")


CostFn = Callable[[int, Action], float]


def _cost(c: float | CostFn, stage: int, action: Action, v: int) -> float:
    if callable(c):
        return float(c(stage, action))
    return float(c) / v


def simulate(
    schedules: Sequence[Sequence[Action]],
    *,
    forward_time: float | CostFn = 1.0,
    backward_time: float | CostFn = 2.0,
    comm_time: float = 0.0,
) -> Timeline:
    """Simulate a pipeline that runs ``schedules[s]`` on stage ``s``.

    Args:
        schedules: one list of `Action` per stage, e.g.
            ``[schedule_1f1b(p, m, s) for s in range(p)]``.
        forward_time: cost of one micro-batch's forward through a whole stage (each of ``v``
            chunks costs ``forward_time / v``), or a function ``(stage, action) -> time`` that
            gives the cost of that one action directly.
        backward_time: likewise for the backward (default 2.0: a backward costs about twice a
            forward, as in Megatron's estimates).
        comm_time: latency added to every stage-to-stage message (0: free communication).

    Returns:
        a `Timeline` (``.bubble_fraction``, ``.peak_inflight``, per-op ``start``/``end``).

    Raises:
        ValueError: invalid schedules, or a schedule that deadlocks (the stuck stages and
            the action each one waits for are named).
    """
    schedules = [list(s) for s in schedules]
    p, m, v = validate_schedules(schedules)
    nvirt = p * v
    done: dict[tuple[str, int, int], float] = {}  # (kind, mb, virtual stage) -> end time
    free = [0.0] * p  # when each stage becomes idle
    pos = [0] * p  # next action per stage
    ops: list[OpRecord] = []

    def ready_time(s: int, a: Action) -> float | None:
        q = a.chunk * p + s
        if a.kind == "F":
            dep = ("F", a.microbatch, q - 1) if q > 0 else None
        else:
            dep = ("B", a.microbatch, q + 1) if q < nvirt - 1 else ("F", a.microbatch, q)
        if dep is None:
            return 0.0
        if dep not in done:
            return None
        local = dep[2] % p == s  # same process: no message to wait for
        return done[dep] + (0.0 if local else comm_time)

    remaining = sum(len(s) for s in schedules)
    while remaining:
        progressed = False
        for s in range(p):
            while pos[s] < len(schedules[s]):
                a = schedules[s][pos[s]]
                t = ready_time(s, a)
                if t is None:
                    break
                start = max(free[s], t)
                cost = _cost(forward_time if a.kind == "F" else backward_time, s, a, v)
                end = start + cost
                ops.append(OpRecord(s, a, start, end))
                done[(a.kind, a.microbatch, a.chunk * p + s)] = end
                free[s] = end
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = ", ".join(
                f"stage {s} at {schedules[s][pos[s]]}" for s in range(p) if pos[s] < len(schedules[s])
            )
            raise ValueError(f"the schedules deadlock: every stage waits ({stuck})")
    return Timeline(ops=ops, num_stages=p, meta={"num_microbatches": m, "num_chunks": v})
