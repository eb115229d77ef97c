"""Checkpoints across layouts: saved in (dp, tp, pp) = (2, 2, 1), resumed in (2, 2, 1) exactly,
and resharded into (1, 1, 2) and (4, 1, 1) within tolerance of the uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from haillm.trainer import train
from haillm.trainer.checkpoint import CheckpointError, load_logical
from haillm.trainer.generate import load_model
from tests.helpers import RUN_RTOL, RUN_WEIGHT_ATOL, run_distributed
from tests.trainer.ckpt_common import make_corpus, run_cfg

STEPS, STOP = 5, 3


def _copy_checkpoint(src: Path, dst: Path) -> None:
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    name = f"step_{STOP:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


def _world4(corpus: str, root: str):
    """Uninterrupted (2,2,1); the same stopped at STOP and resumed; then resumed in (4,1,1)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    root_p, rank = Path(root), dist.get_rank()
    runs = {}
    runs["full"] = train(run_cfg(corpus, root_p / "full", steps=STEPS, dp=2, tp=2))["losses"]
    train(run_cfg(corpus, root_p / "b", steps=STEPS, dp=2, tp=2,
                  extra=[f"run.exit_after={STOP}"]))
    if rank == 0:
        _copy_checkpoint(root_p / "b", root_p / "c")
    runs["same"] = train(run_cfg(corpus, root_p / "b", steps=STEPS, dp=2, tp=2,
                                 extra=["run.resume=true"]))["losses"]
    dist.barrier()
    runs["411"] = train(run_cfg(corpus, root_p / "c", steps=STEPS, dp=4,
                                extra=["run.resume=true"]))["losses"]
    return runs if rank == 0 else None


def _world2(corpus: str, root: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    s = train(run_cfg(corpus, Path(root) / "d", steps=STEPS, pp=2, extra=["run.resume=true"]))
    return s["losses"] if dist.get_rank() == 0 else None


def test_resume_same_and_other_layouts(tmp_path):
    corpus = make_corpus(tmp_path / "tokens.bin")
    runs = run_distributed(_world4, 4, corpus, str(tmp_path), timeout=300,
                           start_method="fork")[0]
    _copy_checkpoint(tmp_path / "b", tmp_path / "d")
    runs["112"] = run_distributed(_world2, 2, corpus, str(tmp_path), timeout=300,
                                  start_method="fork")[0]
    full = runs["full"]
    assert len(full) == STEPS and full[-1] != full[0]
    assert runs["same"] == full[STOP:], "same-layout resume must be bit-identical"
    for lay in ("411", "112"):
        assert len(runs[lay]) == STEPS - STOP
        np.testing.assert_allclose(runs[lay], full[STOP:], rtol=RUN_RTOL, err_msg=lay)
    # the losses of this tiny run move little, so compare the final weights too: the resharded
    # runs end where the uninterrupted one does, far from where they started
    final = f"checkpoints/step_{STEPS:08d}"
    ref, _ = load_logical(tmp_path / "full" / final)
    start, _ = load_logical(tmp_path / "c" / f"checkpoints/step_{STOP:08d}")
    for run in ("b", "c", "d"):
        got, man = load_logical(tmp_path / run / final)
        assert man["step"] == STEPS
        for name, t in ref.items():
            torch.testing.assert_close(got[name], t, rtol=0, atol=RUN_WEIGHT_ATOL,
                                       msg=f"{run} {name}")
    # haillm-generate's loader: the (2,2,1) checkpoint in one process, as a whole model
    model, cfg, _ = load_model(tmp_path / "b")
    assert cfg.parallel.tp == 2 and model.embed.weight.shape == (512, 32)
    torch.testing.assert_close(model.head.weight, ref["head.weight"], rtol=0,
                               atol=RUN_WEIGHT_ATOL)
    moved = max((ref[n] - start[n]).abs().max().item() for n in ref)
    assert moved > 1e-2


def test_resume_refuses_model_mismatch(tmp_path):
    """A checkpoint of another model shape is refused, naming what differs."""
    corpus = make_corpus(tmp_path / "tokens.bin")
    out = tmp_path / "run"
    train(run_cfg(corpus, out, steps=1))
    with pytest.raises(CheckpointError, match=r"another model: hidden_size \(32 saved, 64 now\)"):
        train(run_cfg(corpus, out, steps=2, extra=["run.resume=true", "model.hidden_size=64",
                                                  "model.intermediate_size=128"]))


def _interleaved(corpus: str, out: str, extra: list[str]):
    torch.set_num_threads(1)
    il = ["parallel.pipeline_schedule=interleaved", "parallel.chunks=2"]
    return train(run_cfg(corpus, out, steps=STEPS, pp=2, extra=[*il, *extra]))["losses"]


def test_interleaved_virtual_stages_resume(tmp_path):
    """Two model chunks per rank (interleaved 1F1B): exact resume, then reshard to one rank."""
    corpus = make_corpus(tmp_path / "tokens.bin")
    full = run_distributed(_interleaved, 2, corpus, str(tmp_path / "full"), [],
                           start_method="fork")[0]
    run_distributed(_interleaved, 2, corpus, str(tmp_path / "b"), [f"run.exit_after={STOP}"],
                    start_method="fork")
    _copy_checkpoint(tmp_path / "b", tmp_path / "c")
    same = run_distributed(_interleaved, 2, corpus, str(tmp_path / "b"), ["run.resume=true"],
                           start_method="fork")[0]
    assert same == full[STOP:]
    one = train(run_cfg(corpus, tmp_path / "c", steps=STEPS, extra=["run.resume=true"]))
    np.testing.assert_allclose(one["losses"], full[STOP:], rtol=RUN_RTOL)
