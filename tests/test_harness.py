"""The harness itself: gloo ranks in pytest, failures carry the rank's traceback, hangs time out."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers import RankFailure, assert_lowp_close, run_distributed


def _allreduce_rank() -> tuple[int, int, torch.Tensor]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t


@pytest.mark.parametrize(
    "world_size,start_method", [(1, "fork"), (2, "spawn"), (2, "fork"), (4, "fork")]
)
def test_gloo_ranks_all_reduce(world_size, start_method):
    out = run_distributed(_allreduce_rank, world_size, start_method=start_method)
    expected = world_size * (world_size + 1) / 2
    assert [r for r, _, _ in out] == list(range(world_size))
    assert all(w == world_size for _, w, _ in out)
    assert all(t.item() == expected for _, _, t in out)


def _fail_on_rank(bad: int) -> None:
    if dist.get_rank() == bad:
        raise ValueError(f"deliberate failure on rank {bad}")
    dist.barrier()  # the healthy ranks wait here: the harness must not hang on them


def test_failing_rank_reraises_with_its_traceback():
    with pytest.raises(RankFailure) as info:
        run_distributed(_fail_on_rank, 2, 1, timeout=20, start_method="fork")
    text = str(info.value)
    assert "rank 1 raised" in text
    assert "ValueError: deliberate failure on rank 1" in text
    assert "_fail_on_rank" in text  # the rank's own traceback, not the parent's


def _hang() -> None:
    if dist.get_rank() == 0:
        import time

        time.sleep(60)
    dist.barrier()


def test_hanging_rank_times_out():
    with pytest.raises(RankFailure, match="did not finish|raised"):
        run_distributed(_hang, 2, timeout=3, start_method="fork")


def _exit_hard() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def test_dead_rank_is_reported():
    with pytest.raises(RankFailure, match="rank 1 died without reporting"):
        run_distributed(_exit_hard, 2, timeout=20, start_method="fork")


def test_triton_interpreter_is_on_without_cuda():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


def test_lowp_rule_accepts_and_rejects():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(64, generator=g)
    lowp = truth.to(torch.bfloat16)
    assert_lowp_close(lowp, lowp, truth)
    with pytest.raises(AssertionError, match="kernel error"):
        assert_lowp_close(truth + 0.5, lowp, truth)


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_cuda():
    assert torch.cuda.is_available()
