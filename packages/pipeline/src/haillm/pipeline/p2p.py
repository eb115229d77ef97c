"""Activation specs and point-to-point plumbing for the pipeline executor.

Pipeline stages exchange activations (forward) and their gradients (backward) with
``torch.distributed`` send/recv. A receiver must allocate its buffer *before* the data arrives,
so the shape and dtype of what crosses each stage boundary are declared up front: a
"spec", i.e. one `TensorSpec` or a tuple/list/dict of them (Megatron calls this
``tensor_shape``; it also fixes one shape for every boundary).

Messages between two ranks are matched in the order they were posted (NCCL ignores tags, so we
never rely on them); `check_message_order` proves, from the schedules alone, that every
receiver posts its receives in the order the sender posts its sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .schedules import Action

__all__ = ["TensorSpec", "check_message_order", "flatten_like", "normalize_spec", "unflatten"]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor that crosses a stage boundary (per micro-batch).

    Args:
        shape: e.g. ``(micro_batch_size, seqlen, hidden)``.
        dtype: ``None`` means the executor's default ``dtype``.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


def _is_shape(x: Any) -> bool:
    return isinstance(x, torch.Size) or (
        isinstance(x, (tuple, list)) and all(isinstance(d, int) for d in x)
    )


def normalize_spec(spec: Any, dtype: torch.dtype) -> Any:
    """Turn shapes into `TensorSpec`s with ``dtype`` filled in, keeping the structure.

    A leaf is a `TensorSpec`, a ``torch.Size`` or a tuple/list of ints; a tuple/list of leaves
    or a dict of leaves is a structure (nesting allowed).
    """
    if isinstance(spec, TensorSpec):
        return TensorSpec(tuple(spec.shape), spec.dtype or dtype)
    if _is_shape(spec):
        return TensorSpec(tuple(int(d) for d in spec), dtype)
    if isinstance(spec, dict):
        return {k: normalize_spec(s, dtype) for k, s in spec.items()}
    if isinstance(spec, (tuple, list)):
        return type(spec)(normalize_spec(s, dtype) for s in spec)
    raise TypeError(
        f"tensor_shapes: cannot read {spec!r}; expected a shape such as (4, 16), a TensorSpec, "
        "or a tuple/list/dict of those"
    )


def spec_leaves(spec: Any) -> list[TensorSpec]:
    """The `TensorSpec` leaves of a normalized spec, in a fixed order (dict: the spec's keys)."""
    if isinstance(spec, TensorSpec):
        return [spec]
    items = spec.values() if isinstance(spec, dict) else spec
    return [leaf for s in items for leaf in spec_leaves(s)]


def flatten_like(value: Any, spec: Any, *, what: str = "activation") -> list[torch.Tensor]:
    """The tensors of ``value`` in the order of ``spec``'s leaves, checking shapes and dtypes.

    Raises:
        ValueError: ``value`` does not have the structure, shape or dtype ``spec`` declares.
    """
    if isinstance(spec, TensorSpec):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: expected a tensor of shape {spec.shape}, got {type(value)}")
        if tuple(value.shape) != spec.shape or value.dtype != spec.dtype:
            raise ValueError(
                f"{what}: got shape {tuple(value.shape)} {value.dtype}, but tensor_shapes "
                f"declares {spec.shape} {spec.dtype}"
            )
        return [value]
    if isinstance(spec, dict):
        if not isinstance(value, dict) or set(value) != set(spec):
            got = sorted(value) if isinstance(value, dict) else type(value)
            raise ValueError(f"{what}: expected a dict with keys {sorted(spec)}, got {got}")
        return [t for k in spec for t in flatten_like(value[k], spec[k], what=f"{what}[{k!r}]")]
    if not isinstance(value, (tuple, list)) or len(value) != len(spec):
        raise ValueError(f"{what}: expected a sequence of {len(spec)} items, got {type(value)}")
    return [t for i, s in enumerate(spec) for t in flatten_like(value[i], s, what=f"{what}[{i}]")]


def unflatten(spec: Any, leaves: Sequence[torch.Tensor]) -> Any:
    """Inverse of `flatten_like`: rebuild ``spec``'s structure around ``leaves``."""
    return _build(spec, iter(leaves))


def _build(spec: Any, it: Any) -> Any:
    # A module-level helper on purpose: a recursive closure would form a reference cycle
    # (function -> cell -> function) holding the leaves, i.e. every received activation,
    # until the garbage collector happens to run.
    if isinstance(spec, TensorSpec):
        return next(it)
    if isinstance(spec, dict):
        return {k: _build(v, it) for k, v in spec.items()}
    return type(spec)(_build(v, it) for v in spec)


def message_plan(schedules: Sequence[Sequence[Action]], p: int, v: int):
    """Per directed stage pair, the messages in send order and in receive order.

    A message is ``(kind, microbatch, virtual_stage_of_sender)``. Forward of virtual stage
    ``q < Q-1`` sends to ``q + 1``; backward of ``q > 0`` sends to ``q - 1``.
    """
    nvirt = p * v
    sends: dict[tuple[int, int], list] = {}
    recvs: dict[tuple[int, int], list] = {}
    for s, sched in enumerate(schedules):
        for a in sched:
            q = a.chunk * p + s
            if a.kind == "F":
                if q < nvirt - 1:
                    sends.setdefault((s, (q + 1) % p), []).append(("F", a.microbatch, q))
                if q > 0:
                    recvs.setdefault(((q - 1) % p, s), []).append(("F", a.microbatch, q - 1))
            else:
                if q > 0:
                    sends.setdefault((s, (q - 1) % p), []).append(("B", a.microbatch, q))
                if q < nvirt - 1:
                    recvs.setdefault(((q + 1) % p, s), []).append(("B", a.microbatch, q + 1))
    return sends, recvs


def check_message_order(schedules: Sequence[Sequence[Action]], p: int, v: int) -> None:
    """Raise if some receiver would post its receives in another order than the sender sends.

    Point-to-point messages between two ranks are matched first-posted to first-posted, so a
    mismatch would hand one micro-batch's activation to another (silently, when the shapes
    agree). GPipe, 1F1B and interleaved 1F1B all pass; custom schedules are checked here.
    """
    sends, recvs = message_plan(schedules, p, v)
    for pair in sorted(set(sends) | set(recvs)):
        a, b = sends.get(pair, []), recvs.get(pair, [])
        if a != b:
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ValueError(
                f"schedules: stage {pair[0]} sends message #{i} to stage {pair[1]} as "
                f"{a[i] if i < len(a) else None} but stage {pair[1]} expects "
                f"{b[i] if i < len(b) else None} (messages are matched in order)"
            )


def group_steps(actions: Sequence[Action], *, pair: bool) -> list[list[int]]:
    """Split a stage's list into communication steps (lists of action indices).

    ``pair=False``: one action per step. ``pair=True``: a forward directly followed by a
    backward forms one step, as in Megatron's steady state, whose single batch
    ``send_forward_backward_recv_forward_backward`` carries both actions' messages.
    """
    steps: list[list[int]] = []
    i = 0
    while i < len(actions):
        if pair and actions[i].kind == "F" and i + 1 < len(actions) and actions[i + 1].kind == "B":
            steps.append([i, i + 1])
            i += 2
        else:
            steps.append([i])
            i += 1
    return steps


def batches_complete_in_lockstep(
    schedules: Sequence[Sequence[Action]], p: int, v: int, *, pair: bool = False
) -> bool:
    """Whether waiting for *every* op of each P2P batch (sends too) can never deadlock.

    The executor posts, before step ``t`` (an action, or an F-B pair with ``pair=True``, see
    `group_steps`), one batch: the sends produced by step ``t - 1`` and the receives step ``t``
    needs. Megatron waits for the whole batch; a send then
    completes only when the receiver has posted the matching receive (a rendezvous). This
    plays that protocol on the schedules: a rank leaves batch ``i`` once every op in it has its
    counterpart posted by the peer. Returns False if some ranks would wait for each other.
    """
    nvirt = p * v
    # For every stage, the list of batches; an op is (peer stage, channel, index on channel).
    batches: list[list[list[tuple[int, tuple[int, int], int]]]] = []
    sent: dict[tuple[int, int], int] = {}
    recvd: dict[tuple[int, int], int] = {}
    where: dict[tuple[str, tuple[int, int], int], tuple[int, int]] = {}  # op -> (stage, batch)
    for s, sched in enumerate(schedules):
        steps = group_steps(sched, pair=pair)
        step_of = {i: t for t, idx in enumerate(steps) for i in idx}
        mine: list[list[tuple[int, tuple[int, int], int]]] = [[] for _ in range(len(steps) + 1)]
        for i, a in enumerate(sched):
            t = step_of[i]
            q = a.chunk * p + s
            if a.kind == "F":
                src = (q - 1) % p if q > 0 else None
                dst = (q + 1) % p if q < nvirt - 1 else None
            else:
                src = (q + 1) % p if q < nvirt - 1 else None
                dst = (q - 1) % p if q > 0 else None
            if src is not None and src != s:  # receive before step t: batch t
                ch = (src, s)
                k = recvd[ch] = recvd.get(ch, -1) + 1
                mine[t].append((src, ch, k))
                where[("recv", ch, k)] = (s, t)
            if dst is not None and dst != s:  # send after step t: batch t + 1
                ch = (s, dst)
                k = sent[ch] = sent.get(ch, -1) + 1
                mine[t + 1].append((dst, ch, k))
                where[("send", ch, k)] = (s, t + 1)
        batches.append(mine)
    pos = [0] * p
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            while pos[s] < len(batches[s]):
                ready = True
                for _, ch, k in batches[s][pos[s]]:
                    other = ("recv" if ch[0] == s else "send", ch, k)
                    peer, j = where[other]
                    if pos[peer] < j:
                        ready = False
                        break
                if not ready:
                    break
                pos[s] += 1
                progressed = True
    return all(pos[s] == len(batches[s]) for s in range(p))
