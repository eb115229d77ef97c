"""Where every parameter lives in the flat buffers, and which slice each DP rank owns.

ZeRO-1 (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models") partitions the optimizer states over the N_d data-parallel ranks. We lay
all trainable parameters out in ONE flat buffer (and the fp32 main gradients in a second buffer
with the same layout), in *reverse* parameter order: backward produces the gradients of the
last layers first, so the first bucket fills up first and its reduce-scatter can start while
the earlier layers are still being differentiated.

    flat buffer:  | bucket 0            | bucket 1            | ...
    bucket b:     | chunk r=0 | chunk r=1 | ... | chunk r=N_d-1 |     (equal sizes, padded)

Rank r owns chunk r of every bucket: its reduce-scatter output, its fp32 master weights and its
Adam moments. A parameter may straddle a chunk boundary (then two ranks each update a piece of
it). Padding keeps every bucket divisible by N_d (times `align` elements per chunk, so each
chunk starts on a 64-byte boundary for fp32).

Everything here is plain Python on integers: testable without tensors or process groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Bucket", "Layout", "Segment", "build_layout"]


@dataclass(frozen=True)
class Segment:
    """A contiguous run of elements of ONE parameter inside one rank's chunk of one bucket.

    Attributes:
        param: index of the parameter (in the module's parameter order).
        bucket: bucket index.
        buffer_start: offset of the run in the flat buffer.
        param_start: offset of the run inside the flattened parameter.
        shard_start: offset of the run inside this rank's concatenated shard.
        numel: number of elements.
    """

    param: int
    bucket: int
    buffer_start: int
    param_start: int
    shard_start: int
    numel: int


@dataclass
class Bucket:
    """A contiguous range ``[start, start + numel)`` of the flat buffers (numel % dp == 0)."""

    index: int
    start: int
    numel: int
    params: list[int] = field(default_factory=list)  # parameter indices, in buffer order

    def chunk(self, rank: int, dp: int) -> tuple[int, int]:
        """``(buffer_start, numel)`` of the chunk owned by DP rank `rank`."""
        size = self.numel // dp
        return self.start + rank * size, size


@dataclass
class Layout:
    """The result of `build_layout`: offsets of parameters, buckets and this rank's segments."""

    dp: int
    rank: int
    numel: int  # padded total size of the flat buffers
    param_offsets: list[int]  # flat-buffer offset of each parameter
    param_numels: list[int]
    param_bucket: list[int]  # bucket of each parameter
    buckets: list[Bucket]
    segments: list[Segment]  # this rank's pieces of parameters, in shard order
    shard_numel: int  # = numel // dp: the length of this rank's shard

    @property
    def num_params(self) -> int:
        return len(self.param_numels)

    @property
    def padding(self) -> int:
        """Elements of the flat buffer that belong to no parameter."""
        return self.numel - sum(self.param_numels)

    def shard_offset(self, bucket: int) -> int:
        """Offset of `bucket`'s chunk inside this rank's concatenated shard."""
        return sum(b.numel for b in self.buckets[:bucket]) // self.dp


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def build_layout(
    numels: list[int], *, dp: int, rank: int, bucket_numel: int, align: int = 16
) -> Layout:
    """Assign parameters to buckets (reverse order) and compute this rank's segments.

    Args:
        numels: number of elements of each trainable parameter, in module order.
        dp: data-parallel world size N_d (≥ 1).
        rank: this rank's index in the DP group.
        bucket_numel: a bucket is closed once it holds at least this many elements (a larger
            parameter gets a bucket of its own).
        align: every chunk is a multiple of this many elements.

    Returns:
        The `Layout`.
    """
    if dp < 1:
        raise ValueError(f"dp ({dp}) must be >= 1")
    if not 0 <= rank < dp:
        raise ValueError(f"rank ({rank}) must be in [0, dp={dp})")
    if bucket_numel <= 0:
        raise ValueError(f"bucket_numel ({bucket_numel}) must be > 0")
    n = len(numels)
    offsets = [0] * n
    owner = [0] * n
    buckets: list[Bucket] = []
    cursor = 0
    current: Bucket | None = None

    def close(b: Bucket) -> int:
        used = sum(numels[i] for i in b.params)
        b.numel = _round_up(max(used, 1), dp * align)
        return b.start + b.numel

    for i in reversed(range(n)):  # backward produces the last parameters' gradients first
        if current is None:
            current = Bucket(index=len(buckets), start=cursor, numel=0)
            buckets.append(current)
        offsets[i] = cursor
        owner[i] = current.index
        current.params.append(i)
        cursor += numels[i]
        if cursor - current.start >= bucket_numel:
            cursor = close(current)
            current = None
    if current is not None:
        cursor = close(current)

    segments: list[Segment] = []
    shard_cursor = 0
    for b in buckets:
        c_start, c_numel = b.chunk(rank, dp)
        c_end = c_start + c_numel
        for i in b.params:  # in buffer order
            lo, hi = max(offsets[i], c_start), min(offsets[i] + numels[i], c_end)
            if lo < hi:
                segments.append(Segment(param=i, bucket=b.index, buffer_start=lo,
                                        param_start=lo - offsets[i],
                                        shard_start=shard_cursor + lo - c_start, numel=hi - lo))
        shard_cursor += c_numel
    return Layout(dp=dp, rank=rank, numel=cursor, param_offsets=offsets, param_numels=list(numels),
                  param_bucket=owner, buckets=buckets, segments=segments,
                  shard_numel=cursor // dp)
