"""`PipelineExecutor`: run one stage's schedule for real over torch.distributed point-to-point.

Each rank of the pipeline group builds an executor around *its* model chunk(s) and calls
``run``; the ranks then exchange activations and gradients as their `Action` lists dictate.

    ex = PipelineExecutor(stage_module, group=pp_group, loss_fn=F.cross_entropy,
                          tensor_shapes=(micro_batch, seqlen, hidden), schedule="1f1b")
    losses = ex.run(inputs=mbs_or_None, targets=targets_or_None)   # then optimizer.step()
    val_losses = ex.run_forward(inputs=mbs_or_None, targets=targets_or_None)  # evaluation

How it stays deadlock-free and correct (the teaching points):

* **Batched P2P, sends paired with the next receive.** Before action ``i`` the executor posts,
  in one ``dist.batch_isend_irecv``, the sends produced by action ``i - 1`` and the receive
  action ``i`` needs (Megatron's ``send_forward_recv_backward`` pairing). Like Megatron it
  then waits for the whole batch, sends included, *if* that protocol provably cannot
  deadlock for these schedules (`batches_complete_in_lockstep` plays it on all stages' lists:
  true for GPipe and 1F1B; for interleaved 1F1B with ``m > p`` only when a steady-state
  forward and backward share one batch, Megatron's ``send_forward_backward_recv_forward_
  backward``, which `group_steps(pair=True)` reproduces). For a schedule where neither is
  safe it waits only for the receives and lets sends complete in the background (waited
  for at the end of `run`): a rank then never blocks on a peer that is itself blocked on a
  send, and since the dependency graph is acyclic (`simulate` proves it) every receive is
  eventually satisfied. (NCCL returns one work for a whole batch, so deferred sends are not
  possible there: use the built-in schedules, which are all lockstep-safe, on GPUs. The
  executor is tested with gloo; the NCCL path has not been run.)
* **Messages match in posting order** (NCCL ignores tags): `check_message_order` verifies from
  the schedules that every receiver posts its receives in the order the sender sends.
* **Loss on the last stage**, divided by ``m`` so that the gradients accumulated over the
  micro-batches equal those of the mean loss over the whole batch.
* **Memory.** A micro-batch's input and output are dropped right after its backward. The
  output tensor is sent downstream and otherwise only needed as the *root* of the backward
  (its ``grad_fn``), so once the send has completed its storage is released
  (Megatron's ``deallocate_output_tensor``): ``out.data = torch.empty(1)``. The autograd
  engine checks the incoming gradient against the shape recorded when ``grad_fn`` was
  created, not against ``out.data``, so we start the backward through the engine directly
  (``run_backward``) rather than ``torch.autograd.backward`` (which compares with
  ``out.shape``). If the last op saved its own output (e.g. ``tanh``), autograd holds a second
  reference and nothing is freed, but the result stays correct. The storage can only go once
  the send has completed: right after the batch in lockstep mode, at the end of `run` in
  deferred mode (gloo marks a send complete only when it is waited for).
* **Forward-only** (`run_forward`, evaluation): `schedule_forward_only` over the same batched
  P2P, under ``torch.no_grad()``: no graph, so nothing is kept once an output is sent, no
  gradient message, no backward hook or context.
* **Timing costs no collective.** With ``record=True`` each rank times its actions against
  its own clock, from its own start of `run`: the compute time (the sum of the durations) is
  known locally, every step, for free. Only a *picture* needs the ranks' clocks aligned, so
  `gather_timeline` (a collective anyway) estimates each rank's clock offset once, by a
  ping-pong with stage 0 (Cristian's algorithm), instead of every run paying a barrier.

The real one (Megatron-core) adds: variable sequence lengths and overlapping P2P with compute
through separate streams.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .p2p import (
    TensorSpec,
    batches_complete_in_lockstep,
    check_message_order,
    flatten_like,
    group_steps,
    normalize_spec,
    spec_leaves,
    unflatten,
)
from .schedules import Action, schedule_forward_only, schedule_gpipe, schedule_interleaved_1f1b
from .simulate import OpRecord, Timeline

__all__ = ["PipelineExecutor", "TensorSpec"]

ScheduleLike = str | Callable[..., list[Action]] | Sequence[Action]


def _run_backward(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``torch.autograd.backward`` without the shape check against ``tensor.data``.

    Needed because an output whose storage was released (see the module docstring) has shape
    ``(1,)``; the engine validates the gradient against the shape recorded in the graph.
    """
    torch.autograd.Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
        tensors=tuple(tensors), grad_tensors=tuple(grads), keep_graph=False,
        create_graph=False, inputs=(), allow_unreachable=True, accumulate_grad=True,
    )


def _detach(x: Any) -> Any:
    """``x`` (a tensor or a tuple/list/dict of them) with every tensor detached."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detach(t) for k, t in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(t) for t in x)
    return x


def _release_storage(t: torch.Tensor) -> None:
    """Megatron's pseudo-free: keep the tensor (and its ``grad_fn``), drop its data."""
    t.data = torch.empty((1,), device=t.device, dtype=t.dtype)


class PipelineExecutor:
    """Runs one pipeline stage (one or ``v`` model chunks) over torch.distributed P2P.

    Args:
        chunks: this stage's module, or a list of ``v`` modules for interleaved schedules
            (chunk ``c`` of stage ``s`` is virtual stage ``c * p + s``). Each module is called
            with one argument, the activation (a tensor, or the tuple/dict declared by
            ``tensor_shapes``; on the first virtual stage: the micro-batch input as given to
            `run`), and returns the next activation (on the last virtual stage: the model
            output handed to ``loss_fn``).
        group: the pipeline-parallel process group, its ranks in stage order (``None``: the
            default group). This rank's stage is its rank in ``group``.
        loss_fn: ``loss_fn(output, target) -> scalar``, called on the last stage only (by
            `run_forward` only when it is given targets).
        tensor_shapes: shape of the activation crossing every stage boundary for one
            micro-batch: ``(mb, seq, hidden)``, a `TensorSpec`, or a tuple/list/dict of
            those for structured activations. Floating-point leaves get gradients sent back;
            integer leaves (e.g. position ids) do not.
        dtype: dtype of leaves given as plain shapes (default ``torch.float32``).
        device: where receive buffers live (default: the chunks' parameters' device).
        schedule: ``"1f1b"`` (default), ``"gpipe"``, ``"interleaved"`` (needs ``v > 1``
            chunks), a function ``(p, m, stage[, v]) -> list[Action]``, or this stage's
            explicit list of actions.
        scale_loss: backpropagate ``loss / m`` (gradients of the mean over micro-batches).
        on_last_backward: called as ``on_last_backward(chunk)`` right before the backward of
            the last micro-batch of each chunk on this rank, so hooks that fire during that
            backward can start gradient reduction (the ZeRO reduce-scatter starts here).
        backward_context: ``backward_context(chunk, is_last) -> context manager`` wrapped
            around every backward (e.g. DDP's ``no_sync()`` for all but the last).
        record: record the start/end of every action (``records``, `gather_timeline`). Costs
            two clock reads per action and no communication.
        free_outputs: release sent outputs' storage (Megatron's pseudo-free); on by default.

    Attributes:
        stage, num_stages, num_chunks: this rank's position in the pipeline.
        records: this rank's `OpRecord`s of the last `run` / `run_forward` (when
            ``record=True``), in seconds since *this rank's own* start of that call (no
            barrier: the ranks' zeros differ; `gather_timeline` aligns them). The sum of
            their durations is this rank's compute time.
        peak_inflight: peak number of (micro-batch, chunk) activations alive in the last run.
        released_outputs: how many sent outputs had their storage released in the last run.
    """

    def __init__(
        self,
        chunks: nn.Module | Sequence[nn.Module],
        *,
        group: dist.ProcessGroup | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        tensor_shapes: Any,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        schedule: ScheduleLike = "1f1b",
        scale_loss: bool = True,
        on_last_backward: Callable[[int], None] | None = None,
        backward_context: Callable[[int, bool], Any] | None = None,
        record: bool = False,
        free_outputs: bool = True,
    ) -> None:
        self.chunks = [chunks] if isinstance(chunks, nn.Module) else list(chunks)
        if not self.chunks:
            raise ValueError("chunks must be a module or a non-empty list of modules")
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.num_stages = dist.get_world_size(group)
            self.stage = dist.get_rank(group)
            if self.stage < 0:
                raise ValueError(f"rank {dist.get_rank()} is not a member of the given group")
            self.rank = dist.get_rank()
            self.stage_ranks = [
                s if group is None else dist.get_global_rank(group, s) for s in range(self.num_stages)
            ]
        else:  # a one-stage "pipeline" needs no process group
            self.num_stages, self.stage, self.rank, self.stage_ranks = 1, 0, 0, [0]
        self.num_chunks = len(self.chunks)
        if device is None:
            param = next((p for c in self.chunks for p in c.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.spec = normalize_spec(tensor_shapes, dtype)
        self.leaves = spec_leaves(self.spec)
        self.grad_mask = [leaf.dtype.is_floating_point for leaf in self.leaves]
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.scale_loss = scale_loss
        self.on_last_backward = on_last_backward
        self.backward_context = backward_context
        self.record = record
        self.free_outputs = free_outputs
        self.records: list[OpRecord] = []
        self.peak_inflight = 0
        self.released_outputs = 0
        self._lockstep = self._pair = False
        if self.is_last_virtual(self.num_chunks - 1) and loss_fn is None:
            raise ValueError("loss_fn is required on the last pipeline stage")
        if schedule == "interleaved" and self.num_chunks < 2:
            raise ValueError('schedule="interleaved" needs a list of >= 2 chunks per stage')

    @classmethod
    def from_parallel_dims(
        cls, dims: Any, chunks: nn.Module | Sequence[nn.Module], **kwargs: Any
    ) -> PipelineExecutor:
        """Build the executor on the pipeline group of a built ``haillm.parallel.ParallelDims``.

        Args:
            dims: a built `ParallelDims` (anything with a ``pp_group`` attribute works).
            chunks: this rank's stage module(s), as for the constructor.
            **kwargs: the constructor's keyword arguments (``loss_fn``, ``tensor_shapes``, ...).
        """
        return cls(chunks, group=dims.pp_group, **kwargs)

    # ------------------------------------------------------------------ topology
    def _virtual(self, chunk: int) -> int:
        return chunk * self.num_stages + self.stage

    def is_first_virtual(self, chunk: int) -> bool:
        return self._virtual(chunk) == 0

    def is_last_virtual(self, chunk: int) -> bool:
        return self._virtual(chunk) == self.num_stages * self.num_chunks - 1

    def _rank_of_virtual(self, q: int) -> int:
        return self.stage_ranks[q % self.num_stages]

    def build_schedule(self, num_microbatches: int) -> list[Action]:
        """This stage's action list for ``num_microbatches`` (and check it against the others)."""
        p, m, v, s = self.num_stages, num_microbatches, self.num_chunks, self.stage
        sched = self.schedule
        if isinstance(sched, str):
            builders = {
                "1f1b": lambda st: schedule_interleaved_1f1b(p, m, st, v),
                "interleaved": lambda st: schedule_interleaved_1f1b(p, m, st, v),
                "gpipe": lambda st: schedule_gpipe(p, m, st),
            }
            if sched not in builders:
                raise ValueError(f"schedule must be 'gpipe', '1f1b' or 'interleaved', got {sched!r}")
            if sched == "gpipe" and v > 1:
                raise ValueError(f"schedule='gpipe' runs one chunk per stage; got {v} chunks")
            build = builders[sched]
        elif callable(sched):
            def build(st: int) -> list[Action]:
                return list(sched(p, m, st, v) if v > 1 else sched(p, m, st))
        else:
            mine = list(sched)
            if not any(a.kind == "B" for a in mine):
                raise ValueError("the explicit schedule has no backward; for a forward-only "
                                 "pass call run_forward")
            # The other stages' lists are unknown here: never wait on sends (deferred mode).
            self._lockstep, self._pair = False, False
            got_m = 1 + max(a.microbatch for a in mine)
            if got_m != m:
                raise ValueError(f"the explicit schedule covers {got_m} micro-batches, run got {m}")
            return mine
        everyone = [build(st) for st in range(p)]
        check_message_order(everyone, p, v)
        # Megatron's lockstep protocol where it provably cannot deadlock: one batch per action
        # (GPipe, 1F1B), else one per F-B pair (interleaved with m > p), else deferred sends.
        self._lockstep, self._pair = True, False
        if not batches_complete_in_lockstep(everyone, p, v):
            self._pair = True
            if not batches_complete_in_lockstep(everyone, p, v, pair=True):
                self._lockstep, self._pair = False, False
        return everyone[s]

    # ------------------------------------------------------------------ running
    def _num_microbatches(self, inputs, targets, num_microbatches) -> int:
        m = num_microbatches
        for given in (inputs, targets):
            if given is not None:
                if m is not None and len(given) != m:
                    raise ValueError(f"got {len(given)} micro-batches but num_microbatches={m}")
                m = len(given)
        if m is None:
            raise ValueError("pass inputs, targets or num_microbatches so this stage knows m")
        if self.is_first_virtual(0) and inputs is None:
            raise ValueError("inputs are required on the first pipeline stage")
        return m

    def run(
        self,
        inputs: Sequence[Any] | None = None,
        targets: Sequence[Any] | None = None,
        *,
        num_microbatches: int | None = None,
    ) -> list[torch.Tensor]:
        """Run forward and backward of all micro-batches; gradients accumulate in ``.grad``.

        Every rank of the pipeline group must call this with the same number of micro-batches.

        Args:
            inputs: the micro-batches (list of tensors/structures) on the first stage; may be
                ``None`` elsewhere.
            targets: the micro-batches' targets on the last stage; may be ``None`` elsewhere.
            num_microbatches: ``m``, needed on ranks given neither ``inputs`` nor ``targets``.

        Returns:
            the ``m`` per-micro-batch losses (detached, unscaled) on the last stage; ``[]``
            elsewhere.
        """
        m = self._num_microbatches(inputs, targets, num_microbatches)
        if self.is_last_virtual(self.num_chunks - 1) and targets is None:
            raise ValueError("targets are required on the last pipeline stage")
        actions = self.build_schedule(m)
        last_b = {}  # chunk -> index of its last backward on this rank
        for i, a in enumerate(actions):
            if a.kind == "B":
                last_b[a.chunk] = i

        self._m, self._inputs, self._targets = m, inputs, targets
        self._act_in: dict[tuple[int, int], Any] = {}  # (mb, chunk) -> stage input (structure)
        self._act_out: dict[tuple[int, int], tuple[list, list]] = {}  # -> (roots, grads slots)
        self._mailbox: list[torch.Tensor] = []  # same-rank messages (p == 1), in order
        # (send work, tensor to release after it, payload kept alive until it completes)
        self._pending: list[tuple[Any, torch.Tensor | None, torch.Tensor | None]] = []
        self._losses: list[torch.Tensor] = []
        self.records, self.peak_inflight, self.released_outputs = [], 0, 0
        # No barrier: records are relative to this rank's own start (see `gather_timeline`).
        self._t0 = time.perf_counter()

        outgoing: list[tuple[int, torch.Tensor, bool]] = []  # (dst, tensor, release after)
        for step in group_steps(actions, pair=self._pair):
            # One batch: the previous step's sends and every receive this step needs.
            received = self._communicate(outgoing, [self._recv_buffers(actions[i]) for i in step])
            outgoing = []
            for i, got in zip(step, received):
                a = actions[i]
                t_start = time.perf_counter()
                if a.kind == "F":
                    outgoing += self._forward(a, got)
                else:
                    outgoing += self._backward(a, got, is_last=(last_b[a.chunk] == i))
                if self.record:
                    self.records.append(OpRecord(
                        self.stage, a, t_start - self._t0, time.perf_counter() - self._t0))
            self._poll_sends()
        self._communicate(outgoing, [])
        for work, _, _ in self._pending:
            if work is not None:
                work.wait()
        self._poll_sends()
        assert not self._act_in and not self._act_out, "activations leaked past their backward"
        return self._losses

    def run_forward(
        self,
        inputs: Sequence[Any] | None = None,
        targets: Sequence[Any] | None = None,
        *,
        num_microbatches: int | None = None,
    ) -> list[Any]:
        """Forward only (evaluation, inference): `schedule_forward_only` under ``no_grad``.

        The same P2P machinery as `run` (batched ``isend``/``irecv``, lockstep when
        `batches_complete_in_lockstep` allows it, same-rank messages through a mailbox for a
        one-stage interleaved model) but no gradient messages, no activation kept once it is
        sent, no backward hook (``on_last_backward``, ``backward_context``) and no ``.grad``
        touched. Whatever ``schedule`` the executor trains with, the forward order is
        `schedule_forward_only`'s: the training schedule's forwards, in its order. The
        modules' train/eval mode is left as it is (call ``.eval()`` to switch dropout off).

        Every rank of the pipeline group must call it with the same number of micro-batches.

        Args:
            inputs: the ``m`` micro-batches on the first stage (e.g. ``(mb, seq)`` token ids
                each); may be ``None`` elsewhere.
            targets: optional, on the last stage: the ``m`` targets handed to ``loss_fn``.
            num_microbatches: ``m``, needed on ranks given neither ``inputs`` nor ``targets``.

        Returns:
            on the last virtual stage, per micro-batch and in micro-batch order: with
            ``targets``, ``loss_fn(output, target)`` (scalar, detached, *not* divided by
            ``m``: the same values `run` returns); without, the last chunk's outputs
            (e.g. logits ``(mb, seq, vocab)``, detached). ``[]`` on every other stage.
        """
        m = self._num_microbatches(inputs, targets, num_microbatches)
        p, v, s = self.num_stages, self.num_chunks, self.stage
        everyone = [schedule_forward_only(p, m, st, v) for st in range(p)]
        check_message_order(everyone, p, v)
        # Proven lockstep-safe for p <= 8, m <= 32, v <= 4 (see schedule_forward_only); the
        # deferred protocol stays as the fallback should some other size not be.
        self._lockstep, self._pair = batches_complete_in_lockstep(everyone, p, v), False
        actions = everyone[s]
        self._m, self._inputs, self._targets = m, inputs, targets
        self._mailbox = []
        self._pending = []
        results: list[Any] = []
        self.records, self.peak_inflight, self.released_outputs = [], 0, 0
        self._t0 = time.perf_counter()
        try:
            with torch.no_grad():
                outgoing: list[tuple[int, torch.Tensor, bool]] = []
                for a in actions:
                    (got,) = self._communicate(outgoing, [self._recv_buffers(a)])
                    outgoing = []  # sent (and waited for, in lockstep): let the outputs go
                    t_start = time.perf_counter()
                    outgoing = self._forward_only(a, got, results)
                    del got  # the received activation dies here: nothing is kept per micro-batch
                    self.peak_inflight = 1
                    if self.record:
                        self.records.append(OpRecord(
                            s, a, t_start - self._t0, time.perf_counter() - self._t0))
                    self._poll_sends()
                self._communicate(outgoing, [])
                del outgoing
                for work, _, _ in self._pending:
                    if work is not None:
                        work.wait()
                self._poll_sends()
        finally:  # hold no reference to the caller's micro-batches past the call
            self._inputs = self._targets = None
        assert not self._mailbox, "a same-rank message was never received"
        return results

    def _forward_only(self, a: Action, received: list[torch.Tensor] | None, results: list):
        """One forward of `run_forward` (under ``no_grad``); returns the sends it produces."""
        chunk = a.chunk
        x = self._inputs[a.microbatch] if received is None else unflatten(self.spec, received)
        out = self.chunks[chunk](x)
        if self.is_last_virtual(chunk):
            if self._targets is None:
                results.append(_detach(out))
            else:
                loss = self.loss_fn(out, self._targets[a.microbatch])
                if loss.numel() != 1:
                    raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
                results.append(loss.detach())
            return []
        leaves = flatten_like(out, self.spec, what=f"output of chunk {chunk} (stage {self.stage})")
        dst = self._rank_of_virtual(self._virtual(chunk) + 1)
        # No graph, nothing to pseudo-free: the payload is dropped once its send completes.
        return [(dst, t, False) for t in leaves]

    # -- communication
    def _recv_buffers(self, a: Action) -> tuple[int, tuple, list[torch.Tensor]] | None:
        """(src rank, message key, empty buffers) of what action ``a`` must receive, or None."""
        q = self._virtual(a.chunk)
        if a.kind == "F" and q > 0:
            src, key, leaves = self._rank_of_virtual(q - 1), ("F", a.microbatch, q - 1), self.leaves
        elif a.kind == "B" and not self.is_last_virtual(a.chunk):
            src, key = self._rank_of_virtual(q + 1), ("B", a.microbatch, q + 1)
            leaves = [leaf for leaf, g in zip(self.leaves, self.grad_mask) if g]
        else:
            return None
        bufs = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in leaves]
        return src, key, bufs

    def _communicate(self, outgoing, recvs) -> list[list[torch.Tensor] | None]:
        """Post the previous step's sends and this step's receives as one batch.

        Args:
            outgoing: ``(dst rank, tensor, release after sending)`` triples.
            recvs: per action of the step, `_recv_buffers`' answer (``None``: nothing to get).

        Returns:
            per action of the step, the filled receive buffers (or ``None``).
        """
        ops: list[dist.P2POp] = []
        sent: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (payload, release after)
        for dst, t, release in outgoing:
            if dst == self.rank:  # same process (one-stage interleaving): no message needed
                self._mailbox.append(t.detach().clone())
                continue
            # P2P needs dense memory: a stage may return (or a backward may produce) a
            # non-contiguous view, e.g. a transposed tensor after a sequence-parallel collective
            payload = t.detach().contiguous()
            ops.append(dist.P2POp(dist.isend, payload, dst, group=self.group))
            sent.append((payload, t if release else None))
        for r in recvs:
            if r is not None and r[0] != self.rank:
                ops += [dist.P2POp(dist.irecv, b, r[0], group=self.group) for b in r[2]]
        works = dist.batch_isend_irecv(ops) if ops else []
        if self._lockstep or len(works) != len(ops):
            # Megatron's protocol (and what coalescing backends such as NCCL return anyway):
            # wait for the whole batch, sends included, so sent outputs can be freed now.
            for w in works:
                w.wait()
            self._pending += [(None, t, None) for _, t in sent]
        else:  # deferred: sends complete in the background, waited for at the end of `run`
            # keep the payload alive until its send is waited for (it may be a fresh copy)
            self._pending += [(w, t, payload) for w, (payload, t) in zip(works, sent)]
            for w in works[len(sent):]:
                w.wait()
        out: list[list[torch.Tensor] | None] = []
        for r in recvs:
            if r is None:
                out.append(None)
            elif r[0] == self.rank:
                out.append([self._mailbox.pop(0) for _ in r[2]])
            else:
                out.append(r[2])
        return out

    def _poll_sends(self) -> None:
        """Release the storage of outputs whose sends have completed (without blocking)."""
        keep = []
        for work, t, payload in self._pending:
            if work is None or work.is_completed():
                if t is not None:
                    _release_storage(t)
                    self.released_outputs += 1
            else:
                keep.append((work, t, payload))
        self._pending = keep

    # -- compute
    def _forward(self, a: Action, received: list[torch.Tensor] | None):
        key, chunk = (a.microbatch, a.chunk), a.chunk
        if received is None:  # first virtual stage: the user's micro-batch
            x = self._inputs[a.microbatch]
            in_leaves: list[torch.Tensor] = []
        else:
            in_leaves = [
                t.requires_grad_() if g else t for t, g in zip(received, self.grad_mask)
            ]
            x = unflatten(self.spec, in_leaves)
        with torch.enable_grad():
            out = self.chunks[chunk](x)
            if self.is_last_virtual(chunk):
                loss = self.loss_fn(out, self._targets[a.microbatch])
                if loss.numel() != 1:
                    raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
                self._losses.append(loss.detach())
                root = loss / self._m if self.scale_loss else loss
                self._act_out[key] = ([root], [None])
                self._act_in[key] = in_leaves
                self.peak_inflight = max(self.peak_inflight, len(self._act_in))
                return []
        leaves = flatten_like(out, self.spec, what=f"output of chunk {chunk} (stage {self.stage})")
        roots, slots, outgoing = [], [], []
        in_ids = {id(t) for t in in_leaves}
        j = 0  # index among gradient-carrying leaves
        dst = self._rank_of_virtual(self._virtual(chunk) + 1)
        for t, g in zip(leaves, self.grad_mask):
            # Free the storage after sending only if this tensor owns it and nothing else here
            # uses it (a view, or an input passed straight through, must stay intact).
            release = (
                self.free_outputs and t.requires_grad and t.grad_fn is not None
                and t._base is None and id(t) not in in_ids and dst != self.rank
            )
            outgoing.append((dst, t, release))
            if g and t.requires_grad:
                roots.append(t)
                slots.append(j)
            j += g
        self._act_out[key] = (roots, slots)
        self._act_in[key] = in_leaves
        self.peak_inflight = max(self.peak_inflight, len(self._act_in))
        return outgoing

    def _backward(self, a: Action, received: list[torch.Tensor] | None, *, is_last: bool):
        key, chunk = (a.microbatch, a.chunk), a.chunk
        roots, slots = self._act_out.pop(key)
        in_leaves = self._act_in.pop(key)
        if is_last and self.on_last_backward is not None:
            self.on_last_backward(chunk)
        ctx = self.backward_context(chunk, is_last) if self.backward_context else nullcontext()
        with ctx:
            if roots:
                if received is None:  # the loss: d loss / d loss = 1
                    grads = [torch.ones_like(r) for r in roots]
                else:
                    grads = [received[j] for j in slots]
                _run_backward(roots, grads)
        del roots
        if self.is_first_virtual(chunk):
            return []
        dst = self._rank_of_virtual(self._virtual(chunk) - 1)
        out = []
        for t, g in zip(in_leaves, self.grad_mask):
            if g:  # a leaf the stage did not use still gets a (zero) gradient: shapes are fixed
                grad = t.grad if t.grad is not None else torch.zeros_like(t)
                out.append((dst, grad, False))
        return out

    # ------------------------------------------------------------------ pictures
    def gather_timeline(self, *, clock_rounds: int = 8) -> Timeline:
        """All stages' records of the last run as one `Timeline` (a collective on ``group``).

        Requires ``record=True``. Each rank recorded against its own clock from its own start
        (no barrier in `run`), so the records are first put on one time axis: every stage
        estimates the offset of its ``time.perf_counter`` clock to stage 0's by a ping-pong
        (Cristian's algorithm: send a ping at ``t1``, stage 0 answers with its clock ``T``,
        the answer arrives at ``t2``; the offset is ``(t1 + t2) / 2 - T``, off by at most
        ``(t2 - t1) / 2``; the round trip of ``clock_rounds`` tries with the shortest one is
        kept). Times are then seconds since the earliest start of any rank, in stage 0's
        clock; ``meta["clock_error_s"]`` is the largest bound ``(t2 - t1) / 2``.

        Args:
            clock_rounds: ping-pong round trips per stage (more: a tighter bound).
        """
        if not self.record:
            raise RuntimeError("construct the executor with record=True to gather a timeline")
        if not dist.is_initialized():
            return Timeline(list(self.records), 1, {"measured": True, "clock_error_s": 0.0})
        offset, error = self._clock_offset(clock_rounds)
        start = self._t0 - offset  # this rank's start of the last run, in stage 0's clock
        gathered: list[Any] = [None] * self.num_stages
        dist.all_gather_object(gathered, (start, error, self.records), group=self.group)
        base = min(g[0] for g in gathered)
        ops = [OpRecord(o.stage, o.action, o.start + t - base, o.end + t - base)
               for t, _, recs in gathered for o in recs]
        return Timeline(ops, self.num_stages,
                        {"measured": True, "clock_error_s": max(g[1] for g in gathered)})

    def _clock_offset(self, rounds: int) -> tuple[float, float]:
        """(this rank's ``perf_counter`` minus stage 0's, error bound), in seconds.

        Stage 0 serves the stages one after the other with blocking send/recv, so no two
        exchanges overlap (and nothing else is in flight: `run` has returned everywhere).
        """
        if rounds < 1:
            raise ValueError(f"clock_rounds ({rounds}) must be >= 1")
        buf = torch.zeros(1, dtype=torch.float64, device=self.device)
        root = self.stage_ranks[0]
        if self.stage == 0:
            for peer in self.stage_ranks[1:]:
                for _ in range(rounds):
                    dist.recv(buf, src=peer, group=self.group)
                    buf.fill_(time.perf_counter())
                    dist.send(buf, dst=peer, group=self.group)
            return 0.0, 0.0
        best = (float("inf"), 0.0)  # (round trip, offset)
        for _ in range(rounds):
            t1 = time.perf_counter()
            dist.send(buf, dst=root, group=self.group)
            dist.recv(buf, src=root, group=self.group)
            theirs = buf.item()  # .item() also waits for a device copy to land
            t2 = time.perf_counter()
            best = min(best, (t2 - t1, (t1 + t2) / 2 - theirs))
        return best[1], best[0] / 2
