"""Pipeline schedules as data: the ordered list of forward/backward actions each stage runs.

A schedule says *what* one pipeline stage does and in which order; it knows nothing about
tensors or processes. The same lists drive the event simulation (`simulate.py`), the pictures
(`draw.py`) and the real executor (`executor.py`), so what you look at is what runs.

Notation: ``p`` stages, ``m`` micro-batches, stage ``s`` in ``0..p-1``. An `Action` is
``F``orward or ``B``ackward of one micro-batch on one model chunk of the stage.

* **GPipe** (Huang et al. 2019): all ``m`` forwards, then all ``m`` backwards. Every stage keeps
  the activations of all ``m`` micro-batches alive at once.
* **1F1B** (PipeDream-Flush, Narayanan et al. 2021): stage ``s`` runs ``min(p - s - 1, m)``
  warm-up forwards, then alternates one forward / one backward, then drains the remaining
  backwards. Same bubble as GPipe, but at most ``min(p - s, m)`` micro-batches in flight.
* **Interleaved 1F1B** (Megatron-LM, Narayanan et al. 2021, section 2.2): each stage holds
  ``v`` model chunks (virtual stages ``c * p + s``); micro-batches go through the chunks in
  groups of ``p`` ("chunk-major" order), which divides the bubble by ``v`` at the cost of
  ``v`` times more point-to-point messages. Any ``m >= 1``: when ``p`` does not divide ``m``,
  the schedule is the one for the next multiple of ``p`` with the missing micro-batches taken
  out of the *first* group (empty slots; see `schedule_interleaved_1f1b`).
* **Forward-only** (evaluation, inference): the forwards of the training schedule in the same
  order, without the backwards (`schedule_forward_only`). Nothing waits for a backward, so a
  stage keeps no activation past its forward; the fill and drain remain, ``p - 1`` slots each
  (``p - 1`` chunk slots with interleaving).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Action",
    "schedule_1f1b",
    "schedule_forward_only",
    "schedule_gpipe",
    "schedule_interleaved_1f1b",
    "validate_schedules",
]


@dataclass(frozen=True, order=True)
class Action:
    """One step of a stage's schedule.

    Args:
        kind: ``"F"`` (forward) or ``"B"`` (backward).
        microbatch: index of the micro-batch, ``0 <= microbatch < m``.
        chunk: model chunk on this stage (interleaved schedules; 0 otherwise). Chunk ``c`` of
            stage ``s`` is virtual stage ``c * p + s`` of the whole model.
    """

    kind: Literal["F", "B"]
    microbatch: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("F", "B"):
            raise ValueError(f"Action.kind must be 'F' or 'B', got {self.kind!r}")
        if self.microbatch < 0:
            raise ValueError(f"Action.microbatch ({self.microbatch}) must be >= 0")
        if self.chunk < 0:
            raise ValueError(f"Action.chunk ({self.chunk}) must be >= 0")

    def __str__(self) -> str:  # "F3", or "F3.1" for chunk 1
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def _check(num_stages: int, num_microbatches: int, stage: int) -> None:
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages ({num_stages}) must be an int >= 1")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) must be an int >= 1")
    if not isinstance(stage, int) or not 0 <= stage < num_stages:
        raise ValueError(f"stage ({stage}) must be in [0, num_stages={num_stages})")


def schedule_gpipe(num_stages: int, num_microbatches: int, stage: int) -> list[Action]:
    """GPipe: all forwards, then all backwards (in micro-batch order).

    Returns:
        ``2 * num_microbatches`` actions: ``F0 .. F(m-1), B0 .. B(m-1)``.
    """
    _check(num_stages, num_microbatches, stage)
    m = num_microbatches
    return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]


def schedule_1f1b(num_stages: int, num_microbatches: int, stage: int) -> list[Action]:
    """1F1B (one-forward-one-backward, "PipeDream-Flush").

    Warm-up: ``w = min(p - stage - 1, m)`` forwards. Steady state: ``m - w`` pairs
    ``F(w + i), B(i)``. Cool-down: the last ``w`` backwards. The last stage therefore
    alternates from the start, and stage ``s`` never holds more than ``min(p - s, m)``
    micro-batches' activations.

    Returns:
        ``2 * num_microbatches`` actions.
    """
    _check(num_stages, num_microbatches, stage)
    p, m = num_stages, num_microbatches
    warmup = min(p - stage - 1, m)
    actions = [Action("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        actions += [Action("F", warmup + i), Action("B", i)]
    actions += [Action("B", i) for i in range(m - warmup, m)]  # cool-down
    return actions


def _interleaved_order(k: int, p: int, v: int, backward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of the k-th forward (or backward) of a stage, chunk-major.

    Micro-batches advance in groups of ``p``: chunk 0 takes micro-batches 0..p-1, then chunk 1
    takes the same group, ..., then the next group starts at chunk 0 (Megatron's
    ``get_model_chunk_id``). Backwards visit the chunks in reverse.
    """
    group = k // p  # which block of p consecutive actions
    chunk = group % v
    if backward:
        chunk = v - 1 - chunk
    microbatch = (k // (p * v)) * p + k % p
    return microbatch, chunk


def schedule_interleaved_1f1b(
    num_stages: int, num_microbatches: int, stage: int, num_chunks: int
) -> list[Action]:
    """Interleaved 1F1B with ``num_chunks`` (= v) model chunks per stage (Megatron-LM).

    Each stage runs ``m * v`` forwards and ``m * v`` backwards. Warm-up length is Megatron's
    ``min((p - s - 1) * 2 + (v - 1) * p, m * v)``: the first backward on stage ``s`` is for the
    last chunk of micro-batch 0, which only exists after micro-batch 0 has crossed all
    ``v * p`` virtual stages. With ``num_chunks == 1`` this is exactly `schedule_1f1b`.

    Any ``m >= 1`` (torch.distributed.pipelining's interleaved 1F1B also takes ``m`` that ``p``
    does not divide). When ``p`` does not divide
    ``m``, the schedule is the one for ``m' = p * ceil(m / p)`` micro-batches with the first
    ``m' - m`` of them removed from every stage (and the rest renumbered from 0): the first
    group has ``m mod p`` micro-batches, and its empty slots are idle time. Removing a
    micro-batch from every stage keeps what the full schedule guarantees: the dependencies
    (they are per micro-batch), the receive order of every stage pair (sender and receiver
    drop the same messages); lockstep safety of batched P2P was checked for every
    ``p <= 8, m <= 32, v <= 4`` (and the tests draw from there). Its bubble is above ``(p - 1) / (v m + p - 1)``, by the empty
    slots (e.g. ``p = 4, v = 2``: m = 5: 0.318 vs 0.231; m = 7: 0.192 vs 0.176) but below
    plain 1F1B's ``(p - 1) / (m + p - 1)`` for every ``m >= 2`` (0.375, 0.300). Putting the
    short group first measured a smaller bubble than putting it last (Megatron-core's
    remainder group), whose receive orders do not always match (e.g. ``p = 2, m = 3``).

    Raises:
        ValueError: ``num_chunks < 1`` or an invalid stage / micro-batch count.
    """
    _check(num_stages, num_microbatches, stage)
    p, m, v = num_stages, num_microbatches, num_chunks
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"num_chunks ({num_chunks}) must be an int >= 1")
    if v == 1:
        return schedule_1f1b(p, m, stage)
    full = -(-m // p) * p  # the next multiple of p
    skip = full - m        # micro-batches 0..skip-1 of the full schedule do not exist
    return [Action(a.kind, a.microbatch - skip, a.chunk)
            for a in _interleaved_full(p, full, stage, v) if a.microbatch >= skip]


def _interleaved_full(p: int, m: int, stage: int, v: int) -> list[Action]:
    """Megatron's interleaved 1F1B for ``m`` a multiple of ``p``."""
    total = m * v
    warmup = min((p - stage - 1) * 2 + (v - 1) * p, total)
    fwd = [Action("F", *_interleaved_order(k, p, v, backward=False)) for k in range(total)]
    bwd = [Action("B", *_interleaved_order(k, p, v, backward=True)) for k in range(total)]
    actions = fwd[:warmup]
    for i in range(total - warmup):
        actions += [fwd[warmup + i], bwd[i]]
    actions += bwd[total - warmup:]
    return actions


def schedule_forward_only(
    num_stages: int, num_microbatches: int, stage: int, num_chunks: int = 1
) -> list[Action]:
    """Forward-only (evaluation / inference) schedule: ``m * v`` forwards, no backward.

    With one chunk: ``F0 .. F(m-1)``. With ``num_chunks = v > 1`` (chunk ``c`` of stage ``s``
    is virtual stage ``c * p + s``) the forwards run in the chunk-major order of
    `schedule_interleaved_1f1b` (groups of ``p`` micro-batches cross chunk 0, then chunk 1, ...;
    Megatron's forward-only interleaved pass uses the same order): stage 0 starts chunk 1 of
    micro-batch 0 only after micro-batches ``0..p-1`` went through chunk 0, by which time
    micro-batch 0 has come back around the ring, so no stage waits after the fill. It *is* the
    training schedule with its backwards removed, for every ``p, m, v``; so the receive
    orders still match (`check_message_order`), the per-micro-batch losses come out in the same
    order as in training, and batched P2P in lockstep cannot deadlock (checked by
    `batches_complete_in_lockstep` for every ``p <= 8, m <= 32, v <= 4``).

    Returns:
        ``num_microbatches * num_chunks`` ``"F"`` actions.

    Raises:
        ValueError: an invalid stage, micro-batch or chunk count.
    """
    _check(num_stages, num_microbatches, stage)
    p, m, v = num_stages, num_microbatches, num_chunks
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"num_chunks ({num_chunks}) must be an int >= 1")
    if v == 1:
        return [Action("F", i) for i in range(m)]
    full = -(-m // p) * p  # the same remainder rule as schedule_interleaved_1f1b
    skip = full - m
    order = (_interleaved_order(k, p, v, backward=False) for k in range(full * v))
    return [Action("F", mb - skip, c) for mb, c in order if mb >= skip]


def validate_schedules(schedules: list[list[Action]]) -> tuple[int, int, int]:
    """Check a full pipeline's schedules (one list per stage) and return ``(p, m, v)``.

    Every stage must run each (micro-batch, chunk) forward exactly once and its backward
    exactly once, after that forward; all stages must agree on ``m`` and ``v``. A pipeline
    with no backward on any stage is a *forward-only* one (`schedule_forward_only`): then
    every forward must appear exactly once.

    Raises:
        ValueError: naming the stage and the action at fault.
    """
    if not schedules:
        raise ValueError("schedules must hold one list of Actions per stage (got none)")
    p = len(schedules)
    units = {(a.microbatch, a.chunk) for sched in schedules for a in sched}
    if not units:
        raise ValueError("schedules hold no actions")
    m = 1 + max(mb for mb, _ in units)
    v = 1 + max(c for _, c in units)
    want = {(mb, c) for mb in range(m) for c in range(v)}
    # Forward-only only when *no* stage has a backward: a training pipeline that forgot some
    # backwards must still fail below.
    forward_only = not any(isinstance(a, Action) and a.kind == "B" for sch in schedules for a in sch)
    for s, sched in enumerate(schedules):
        seen_f: set[tuple[int, int]] = set()
        seen_b: set[tuple[int, int]] = set()
        for i, a in enumerate(sched):
            if not isinstance(a, Action):
                raise ValueError(f"stage {s}: item {i} is {a!r}, not an Action")
            key = (a.microbatch, a.chunk)
            if a.kind == "F":
                if key in seen_f:
                    raise ValueError(f"stage {s}: {a} appears twice")
                seen_f.add(key)
            else:
                if key not in seen_f:
                    raise ValueError(f"stage {s}: {a} comes before its forward")
                if key in seen_b:
                    raise ValueError(f"stage {s}: {a} appears twice")
                seen_b.add(key)
        missing = sorted(want - (seen_f if forward_only else seen_b))
        if missing:
            mb, c = missing[0]
            what, kind = (("forward", "a forward-only pipeline: ") if forward_only
                          else ("backward (or forward)", ""))
            raise ValueError(
                f"stage {s}: no {what} for micro-batch {mb} chunk {c} ({kind}expected "
                f"m={m} micro-batches x v={v} chunks on every stage)"
            )
    return p, m, v
