"""A rank killed with SIGKILL mid-run: the launcher stops the run with a clear message, and
`--resume` continues from the last complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from haillm.trainer.checkpoint import checkpoints, verify_checkpoint
from tests.trainer.ckpt_common import make_corpus


def _cmd(corpus, out, *extra, nproc=2):
    return [sys.executable, "-m", "haillm.trainer.cli", "--preset", "micro", "--nproc",
            str(nproc), "--dp", str(nproc), "--precision", "fp32", "--out", str(out),
            "--set", f"data.corpus={corpus}", "--set", "data.val_fraction=0",
            "--set", "train.eval_every=0", "--set", "run.sample_tokens=0",
            "--set", "run.tensorboard=false", "--set", "parallel.microbatches=2", *extra]


def test_killed_rank_stops_run_and_resume_continues(tmp_path):
    corpus = make_corpus(tmp_path / "tokens.bin")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(corpus, out, "--steps", "100000", "--save-every", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoints(out / "checkpoints"):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert checkpoints(out / "checkpoints"), "no checkpoint within 2 minutes"
        pid = int((out / "pids" / "rank_00001").read_text())
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert "rank 1" in err and "killed by signal SIGKILL" in err, err[-3000:]
    assert "the launcher stopped the run" in err and "with --resume" in err
    # every renamed checkpoint is complete and intact; the newest is what --resume takes
    # (here in one process: the resume reshards dp=2 -> 1, and starts without a launcher)
    newest = checkpoints(out / "checkpoints")[-1]
    step = verify_checkpoint(newest)["step"]
    res = subprocess.run(_cmd(corpus, out, "--steps", "100000", "--resume", "--exit-after",
                              str(step + 2), nproc=1), capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    both = res.stdout + res.stderr
    assert f"resumed from {newest} at step {step} (resharded from dp=2" in both
    assert verify_checkpoint(checkpoints(out / "checkpoints")[-1])["step"] == step + 2


def test_rank_failure_message_names_rank_cause_and_checkpoint(tmp_path):
    from types import SimpleNamespace

    from haillm.trainer.cli import _rank_failure_message

    err = SimpleNamespace(failures={
        1: SimpleNamespace(exitcode=-9, pid=11, error_file_data={}, message=""),
        0: SimpleNamespace(exitcode=1, pid=10, message="",
                           error_file_data={"message": {"message": "FloatingPointError: "
                                                        "non-finite loss nan at step 7"}})})
    msg = _rank_failure_message(err, tmp_path)
    assert msg.startswith("rank 0 (pid 10) exited with code 1 (FloatingPointError: non-finite "
                          "loss nan at step 7); rank 1 (pid 11) was killed by signal SIGKILL")
    assert "no complete checkpoint to resume from" in msg
