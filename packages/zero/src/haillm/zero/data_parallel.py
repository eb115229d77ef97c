"""ZeroDataParallel: fp32 gradient accumulation and overlapped, bucketed reduce-scatter/all-reduce.

What happens to one gradient (DeepSeek LLM §2.4: "gradients are accumulated in fp32"; ZeRO-1):

1. backward writes ``param.grad`` in the parameter's dtype (bf16);
2. the parameter's post-accumulate-grad hook adds it into the parameter's slot of ONE flat fp32
   *main-grad* buffer and frees the bf16 ``.grad`` (so micro-batches accumulate in fp32, and
   at most one bf16 gradient per parameter exists at a time);
3. on the **last** micro-batch only (the others run under `no_sync()`), once every parameter
   of a bucket has its gradient, that bucket's reduce-scatter starts asynchronously, while
   backward continues with earlier layers: communication overlaps computation;
4. `finish_grad_sync()` waits for all buckets and divides this rank's shard by N_d (average).

The parameters themselves are moved into one flat buffer with the same layout, so that the
optimizer can write its updated shard in place and all-gather whole buckets.

``shard=False`` is plain data parallelism ("ZeRO off") on the same buffers and hooks: step 3
all-reduces each whole bucket instead (still launched from the hooks, overlapped with the same
backward), step 4 divides the whole buffer by N_d, and every rank owns everything: the layout is
built with ONE shard (``layout.dp == 1``) but the sharded mode's bucket boundaries, so the
optimizer keeps the full fp32 state and updates all of it, with nothing to all-gather.

The teaching version of the same data flow (no buckets, no overlap, no flat buffers) is
`haillm.zero.reference.naive_zero1_step`; this one adds the flat layout, the fp32 buffer, the
buckets and their overlap with backward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from haillm.zero.comm import (
    REDUCE_SCATTER_IMPLS,
    all_reduce_async,
    group_rank,
    group_size,
    reduce_scatter_async,
)
from haillm.zero.layout import Layout, build_layout

__all__ = ["ZeroDataParallel"]

_ALIGN = 16  # elements per chunk multiple: 64-byte chunk starts for fp32


class ZeroDataParallel(nn.Module):
    """Wrap a module for ZeRO-1 (or plain) data parallelism with fp32 main gradients.

    Args:
        module: the model; its trainable parameters must share one dtype (bf16, fp16 or fp32)
            and one device, and be identical on every rank of `dp_group`.
        dp_group: the data-parallel process group (None: the default group, or a single rank
            when torch.distributed is not initialised).
        bucket_mb: bucket size in MiB of main-grad buffer (> 0). Smaller buckets start
            communicating earlier; larger ones use the network better.
        grad_dtype: dtype of the main-grad buffer (``torch.float32``; ``torch.bfloat16`` halves
            the gradient memory at the cost of accumulation precision).
        overlap: launch each bucket's reduce-scatter from the backward hooks (True), or all
            of them in `finish_grad_sync` (False, for comparison).
        reduce_scatter: ``"auto"``, ``"reduce_scatter"``, ``"all_to_all"`` or
            ``"all_reduce"`` (see `haillm.zero.comm.reduce_scatter_async`).
        check_replicas: verify at wrap time (one all-reduce of a checksum) that every rank of
            `dp_group` holds the same parameters.
        shard: True (default): ZeRO-1, each bucket is reduce-scattered and rank r owns chunk r
            of it (its optimizer holds 1/N_d of the state). False: plain data parallelism,
            each bucket is all-reduced from the same hooks (`reduce_scatter` is then unused)
            and every rank owns, and its optimizer updates, the whole buffer.

    Attributes:
        main_grad: (numel,) the flat main-grad buffer (grad_dtype); after `finish_grad_sync`
            this rank's chunks (with ``shard=False``: all of it) hold the DP-averaged gradient.
        param_buffer: (numel,) the flat parameter buffer (the module's parameters are views).
        layout: the `haillm.zero.layout.Layout` (buckets, offsets, this rank's segments); its
            ``dp``/``rank`` are the number of shards and this rank's shard: (N_d, r) sharded,
            (1, 0) unsharded. Both modes have the same offsets and bucket boundaries.
        dp, dp_rank: size of `dp_group` and this rank's index in it (both modes).
        shard: the mode.
        comm: ``"reduce_scatter"`` (sharded) or ``"all_reduce"`` (unsharded): the gradient
            collective, and the prefix of its trace events.
        trace: set to a list to record ``(event, index, time_ns)`` tuples: ``"grad_ready"``
            (parameter index), ``f"{comm}_start"`` / ``f"{comm}_done"`` (bucket index), i.e.
            ``"reduce_scatter_start"`` sharded, ``"all_reduce_start"`` unsharded.
    """

    def __init__(self, module: nn.Module, *, dp_group=None, bucket_mb: float = 25.0,
                 grad_dtype: torch.dtype = torch.float32, overlap: bool = True,
                 reduce_scatter: str = "auto", check_replicas: bool = True, shard: bool = True):
        super().__init__()
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb ({bucket_mb}) must be > 0")
        if grad_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"grad_dtype must be torch.float32 or torch.bfloat16, got {grad_dtype}")
        if reduce_scatter not in REDUCE_SCATTER_IMPLS:
            raise ValueError(f"reduce_scatter must be one of {REDUCE_SCATTER_IMPLS}, "
                             f"got {reduce_scatter!r}")
        self.module = module
        self.dp_group = dp_group
        self.dp = group_size(dp_group)
        self.dp_rank = group_rank(dp_group)
        self.overlap = overlap
        self.bucket_mb = bucket_mb
        self.reduce_scatter_impl = reduce_scatter
        self.grad_dtype = grad_dtype
        self.shard = bool(shard)
        self.comm = "reduce_scatter" if self.shard else "all_reduce"
        self.trace: list | None = None

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("module has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"all trainable parameters must be on one device, found {devices} "
                             "(move the module with .to(device) before wrapping)")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise ValueError(f"all trainable parameters must share one dtype, found {dtypes} "
                             "(cast the module with .to(dtype) before wrapping)")
        self.device, self.param_dtype = devices.pop(), dtypes.pop()
        if not self.param_dtype.is_floating_point:
            raise ValueError(f"parameters must be floating point, got {self.param_dtype}")
        self._check_placement(check_replicas)

        elem = torch.empty((), dtype=grad_dtype).element_size()
        bucket_numel = max(1, int(bucket_mb * 2**20 / elem))
        # Unsharded: one shard owning everything, but buckets padded to multiples of N_d·16 as
        # in the sharded mode, so both modes have the same offsets and bucket boundaries (the
        # same all-reduce calls as reduce_scatter="all_reduce", hence the same sums).
        self.layout: Layout = build_layout(
            [p.numel() for p in self.params], dp=self.dp if self.shard else 1,
            rank=self.dp_rank if self.shard else 0, bucket_numel=bucket_numel,
            align=_ALIGN if self.shard else _ALIGN * self.dp)
        L = self.layout
        # The flat parameter buffer: the module's parameters become views of it.
        self.param_buffer = torch.zeros(L.numel, dtype=self.param_dtype, device=self.device)
        with torch.no_grad():
            for p, off in zip(self.params, L.param_offsets):
                view = self.param_buffer[off:off + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
        self.main_grad = torch.zeros(L.numel, dtype=grad_dtype, device=self.device)
        self._grad_views = [self.main_grad[off:off + p.numel()].view_as(p)
                            for p, off in zip(self.params, L.param_offsets)]

        self._sync = True  # False inside no_sync(): gradients only accumulate
        self._ready = [0] * len(L.buckets)  # parameters of each bucket whose gradient arrived
        self._seen = [False] * len(self.params)
        self._next_bucket = 0  # buckets launch strictly in order: same order on every rank
        self._handles: list = [None] * len(L.buckets)
        self._synced = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, p in enumerate(self.params)]

    # ------------------------------------------------------------------ checks
    def _check_placement(self, check_replicas: bool) -> None:
        if self.dp == 1:
            return
        backend = str(dist.get_backend(self.dp_group))
        if "nccl" in backend and "gloo" not in backend and self.device.type != "cuda":
            raise ValueError(f"dp_group uses NCCL but the parameters are on {self.device}: move "
                             "the module to its GPU before wrapping")
        if backend == "gloo" and self.device.type != "cpu":
            raise ValueError(f"dp_group uses gloo but the parameters are on {self.device}: use "
                             "an NCCL group for GPU parameters")
        if not check_replicas:
            return
        # A cheap checksum, computed on the device in fp64 (no copy of the parameters):
        # count, numel, Σx and Σ (i+1)·‖x_i‖² (the index weight catches swapped parameters).
        with torch.no_grad():
            sums = torch.stack([torch.sum(p.detach(), dtype=torch.float64) for p in self.params])
            sqs = torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64) ** 2
                               for p in self.params])
            weights = torch.arange(1, len(self.params) + 1, dtype=torch.float64,
                                   device=sums.device)
            numel = float(sum(p.numel() for p in self.params))
            local = torch.stack([torch.tensor(float(len(self.params)), dtype=torch.float64,
                                              device=sums.device),
                                 torch.tensor(numel, dtype=torch.float64, device=sums.device),
                                 sums.sum(), (weights * sqs).sum()])
        ref = local.clone()
        src = dist.get_global_rank(self.dp_group, 0) if self.dp_group is not None else 0
        dist.broadcast(ref, src=src, group=self.dp_group)
        local, ref = local.cpu(), ref.cpu()
        bad = torch.tensor([0.0 if torch.allclose(local, ref, rtol=1e-9, atol=0) else 1.0],
                           device=self.device)
        dist.all_reduce(bad, group=self.dp_group)
        if bad.item() > 0:
            raise ValueError(
                "the parameters differ across the ranks of dp_group (checksums "
                f"{local.tolist()} here vs {ref.tolist()} on its rank 0): dp_group must be the "
                "data-parallel group (ranks holding replicas of the same model shard, not a "
                "tensor/pipeline-parallel group), and every replica must start from the same "
                "seed or weights")

    # ------------------------------------------------------------------ hooks
    def _record(self, event: str, index: int) -> None:
        if self.trace is not None:
            self.trace.append((event, index, time.perf_counter_ns()))

    def _make_hook(self, i: int):
        def hook(param: torch.Tensor) -> None:
            self._on_grad(i, param)
        return hook

    @torch.no_grad()
    def _on_grad(self, i: int, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        b = self.layout.param_bucket[i]
        if self._handles[b] is not None or self._synced:
            raise RuntimeError(
                f"gradient of {self.param_names[i]!r} arrived after its bucket {b} was already "
                f"communicated ({self.comm}): run the other micro-batches under no_sync(), and call "
                "zero_grad() (or the optimizer's step/zero_grad) before the next iteration")
        self._grad_views[i].add_(param.grad)  # fp32 accumulation (upcast inside the add)
        param.grad = None  # free the low-precision gradient right away
        self._record("grad_ready", i)
        if not self._sync:
            return
        if not self._seen[i]:
            self._seen[i] = True
            self._ready[b] += 1
        if self.overlap:
            self._launch_ready()

    def _launch(self, b: int) -> None:
        bucket = self.layout.buckets[b]
        whole = self.main_grad[bucket.start:bucket.start + bucket.numel]
        self._record(f"{self.comm}_start", b)
        if self.shard:
            start, n = bucket.chunk(self.dp_rank, self.dp)
            self._handles[b] = reduce_scatter_async(whole, self.main_grad[start:start + n],
                                                    self.dp_group, impl=self.reduce_scatter_impl)
        else:
            self._handles[b] = all_reduce_async(whole, self.dp_group)
        if self._handles[b] is None:
            self._handles[b] = _Done()

    def _launch_ready(self) -> None:
        buckets = self.layout.buckets
        while (self._next_bucket < len(buckets)
               and self._ready[self._next_bucket] == len(buckets[self._next_bucket].params)):
            self._launch(self._next_bucket)
            self._next_bucket += 1

    # ------------------------------------------------------------------ public API
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate into the fp32 main grads (no communication)."""
        old = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = old

    def set_grad_sync(self, enabled: bool) -> None:
        """Imperative `no_sync`: a pipeline executor sets True right before the backward of the
        last micro-batch (known from its schedule) and False for the others."""
        self._sync = bool(enabled)

    def start_grad_sync(self) -> None:
        """Launch the reduce-scatter (unsharded: all-reduce) of every bucket not launched yet
        (in bucket order), e.g. buckets holding parameters that received no gradient."""
        while self._next_bucket < len(self.layout.buckets):
            self._launch(self._next_bucket)
            self._next_bucket += 1

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """Wait for every bucket; afterwards this rank's chunks of `main_grad` (unsharded: the
        whole buffer) hold the gradient averaged over the DP group. Idempotent until
        `zero_grad`.

        Both modes sum in the collective and then multiply what this rank owns by 1/N_d, after
        the wait: the same convention, and for N_d a power of two an exact scaling, so the
        average is the sum's rounding only.
        """
        if self._synced:
            return
        self.start_grad_sync()
        for b, h in enumerate(self._handles):
            h.wait()
            self._record(f"{self.comm}_done", b)
        if self.dp > 1:
            for view in self.shard_grad_views():
                view.mul_(1.0 / self.dp)  # SUM -> mean (gloo has no ReduceOp.AVG)
        self._synced = True

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - nn.Module signature
        """Zero the main-grad buffer and forget the previous iteration's communication."""
        for h in self._handles:
            if h is not None:
                h.wait()
        self.main_grad.zero_()
        for p in self.params:
            p.grad = None
        self._ready = [0] * len(self.layout.buckets)
        self._seen = [False] * len(self.params)
        self._next_bucket = 0
        self._handles = [None] * len(self.layout.buckets)
        self._synced = False

    def _owned(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        L = self.layout  # (L.dp, L.rank): (N_d, r) sharded, (1, 0) unsharded
        out = []
        for bucket in L.buckets:
            start, n = bucket.chunk(L.rank, L.dp)
            out.append(buffer[start:start + n])
        return out

    def shard_grad_views(self) -> list[torch.Tensor]:
        """This rank's chunk of `main_grad`, one (B_b/N_d,) view per bucket (unsharded: the
        whole (B_b,) bucket)."""
        return self._owned(self.main_grad)

    def shard_param_views(self) -> list[torch.Tensor]:
        """This rank's chunk of `param_buffer`, one (B_b/N_d,) view per bucket (unsharded: the
        whole (B_b,) bucket)."""
        return self._owned(self.param_buffer)

    def main_grad_of(self, name: str) -> torch.Tensor:
        """The fp32 accumulated gradient of parameter `name` (full shape; before the sync it is
        this rank's local sum, after it only this rank's owned elements are meaningful: all of
        them unsharded)."""
        return self._grad_views[self.param_names.index(name)]


class _Done:
    """The handle of a collective on a single rank: nothing to wait for."""

    def wait(self) -> bool:
        return True
