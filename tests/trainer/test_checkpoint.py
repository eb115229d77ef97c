"""Checkpoints in one process: exact resume, refused corrupt checkpoints, safe saving, NaNs."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch

from haillm.trainer import train
from haillm.trainer.checkpoint import (
    CheckpointError,
    checkpoints,
    latest_checkpoint,
    load_logical,
    verify_checkpoint,
)
from tests.trainer.ckpt_common import make_corpus, run_cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "tokens.bin")


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    torch.set_num_threads(1)
    return train(run_cfg(corpus, tmp_path_factory.mktemp("a")))["losses"]


@pytest.fixture()
def saved(corpus, tmp_path):
    """A run stopped by --exit-after 4 with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    train(run_cfg(corpus, out, extra=["run.exit_after=4", "run.save_every=2"]))
    return out


def _resume(corpus, out):
    log = io.StringIO()
    losses = train(run_cfg(corpus, out, extra=["run.resume=true"]), stream=log)["losses"]
    return losses, log.getvalue()


def test_same_layout_resume_is_exact(corpus, saved, uninterrupted):
    assert [p.name for p in checkpoints(saved / "checkpoints")] == ["step_00000002",
                                                                    "step_00000004"]
    man = verify_checkpoint(saved / "checkpoints" / "step_00000004")
    assert man["step"] == 4 and man["layout"]["dp"] == 1 and man["files"]
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())
    losses, log = _resume(corpus, saved)
    assert "resumed from" in log and "step 4 (same layout)" in log
    assert losses == uninterrupted[4:]  # bit-identical continuation
    # metrics.jsonl is appended: steps 1..6 once each
    steps = [json.loads(x)["step"] for x in (saved / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _distcp(ckpt):
    return sorted(ckpt.glob("*.distcp"))[0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "no-manifest"])
def test_damaged_checkpoint_refused_older_used(corpus, saved, uninterrupted, damage):
    new, old = saved / "checkpoints" / "step_00000004", saved / "checkpoints" / "step_00000002"
    f = _distcp(new)
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        expect = "checksum mismatch"
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
        expect = "truncated"
    elif damage == "missing":
        f.unlink()
        expect = "missing file"
    else:
        (new / "manifest.json").unlink()
        expect = "incomplete checkpoint"
    with pytest.raises(CheckpointError, match=expect):
        verify_checkpoint(new)
    with pytest.raises(CheckpointError, match=expect):
        load_logical(new)  # generation refuses it too
    assert verify_checkpoint(old)["step"] == 2
    refused = []
    assert latest_checkpoint(saved / "checkpoints", log=refused.append)[0] == old
    assert expect in refused[0]
    losses, log = _resume(corpus, saved)
    assert "refusing checkpoint" in log and "at step 2" in log
    assert losses == uninterrupted[2:]
    # steps 3 and 4 of the first run were logged, then logged again by the resumed run: once
    steps = [json.loads(x)["step"] for x in (saved / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_failure_while_saving_keeps_previous(corpus, tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    ck = sys.modules["haillm.trainer.checkpoint"]

    def fail_at_4(step, tmp):
        if step == 4:
            raise OSError(f"injected failure while saving checkpoint step {step}")

    monkeypatch.setattr(ck, "_fault_point", fail_at_4)
    with pytest.raises(OSError, match="injected failure while saving checkpoint step 4"):
        train(run_cfg(corpus, out, extra=["run.save_every=2"]))
    monkeypatch.undo()
    root = out / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir()  # the half-written one, never renamed
    assert [p.name for p in checkpoints(root)] == ["step_00000002"]
    verify_checkpoint(root / "step_00000002")
    losses, _ = _resume(corpus, out)
    assert losses == uninterrupted[2:]
    assert not (root / ".tmp-step_00000004").exists()  # cleaned by the next save


def test_keep_last_k(corpus, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(corpus, out, steps=5, extra=["run.save_every=1"]))
    assert [p.name for p in checkpoints(out / "checkpoints")] == [
        "step_00000003", "step_00000004", "step_00000005"]
    out2 = tmp_path / "run2"
    train(run_cfg(corpus, out2, steps=3, extra=["run.save_every=1", "run.keep_checkpoints=1"]))
    assert [p.name for p in checkpoints(out2 / "checkpoints")] == ["step_00000003"]


def test_nonfinite_loss_stops_with_step(corpus, tmp_path, monkeypatch):
    tr = sys.modules["haillm.trainer.train"]  # the package exports a function of that name

    class NaNModel(tr.DeepSeekLM):  # a NaN weight: the very first loss is NaN
        def materialize_(self, *args, **kwargs):  # the trainer's model is lazy
            names = super().materialize_(*args, **kwargs)
            if "norm.weight" in names:
                self.norm.weight.data.fill_(float("nan"))
            return names

    monkeypatch.setattr(tr, "DeepSeekLM", NaNModel)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 1"):
        train(run_cfg(corpus, tmp_path / "nan", steps=3))


def test_nonfinite_grads_stop_without_loss_scaler(corpus, tmp_path):
    # lr 1e30 blows the weights up after step 1: step 2's gradients are NaN (loss still finite)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm (nan|inf) at step 2"):
        train(run_cfg(corpus, tmp_path / "nan", steps=4, extra=["train.lr=1e30",
                                                               "train.warmup_steps=0"]))


def test_fp16_overflow_skips_step_and_logs(corpus, tmp_path, monkeypatch):
    zopt = sys.modules["haillm.zero.optimizer"]

    class HugeScaler(zopt.DynamicLossScaler):  # a scale so large that the fp16 backward overflows
        def __init__(self):
            super().__init__(init_scale=2.0**40)

    monkeypatch.setattr(zopt, "DynamicLossScaler", HugeScaler)
    log = io.StringIO()
    train(run_cfg(corpus, tmp_path / "fp16", steps=2, precision="fp16"), stream=log)
    recs = [json.loads(x) for x in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["skipped"] is True and recs[1]["loss_scale"] == 2.0**38
    assert "step 1: non-finite gradients, update skipped" in log.getvalue()


def test_copy_of_checkpoint_loads_elsewhere(saved):
    """A checkpoint folder is self-contained: copied anywhere, it verifies and loads."""
    dst = saved.parent / "copy" / "step_00000004"
    shutil.copytree(saved / "checkpoints" / "step_00000004", dst)
    tensors, man = load_logical(dst)
    assert man["step"] == 4 and tensors["embed.weight"].shape == (512, 32)


def test_resume_exact_in_bf16(corpus, tmp_path):
    """bf16 weights are the fp32 master cast, so they need no copy: still bit-identical."""
    bf16 = dict(precision="bf16")
    full = train(run_cfg(corpus, tmp_path / "a", **bf16))["losses"]
    train(run_cfg(corpus, tmp_path / "b", **bf16, extra=["run.exit_after=3"]))
    again = train(run_cfg(corpus, tmp_path / "b", **bf16, extra=["run.resume=true"]))["losses"]
    assert again == full[3:]


@pytest.mark.gpu
def test_resume_and_generate_on_cuda(corpus, tmp_path):
    """On one GPU in bf16: exact resume, then the checkpoint generates on the GPU."""
    from haillm.trainer.generate import generate, load_model

    cuda = ["run.device=cuda"]
    full = train(run_cfg(corpus, tmp_path / "a", precision="bf16", extra=cuda))["losses"]
    train(run_cfg(corpus, tmp_path / "b", precision="bf16", extra=[*cuda, "run.exit_after=3"]))
    again = train(run_cfg(corpus, tmp_path / "b", precision="bf16",
                          extra=[*cuda, "run.resume=true"]))["losses"]
    assert again == full[3:]
    model, _, _ = load_model(tmp_path / "b", device="cuda")
    prompt = torch.tensor([[5, 17, 300]], device="cuda")
    assert torch.equal(generate(model, prompt, 8, temperature=0),
                       model.generate(prompt, 8, temperature=0))
