"""Runs that never lose or mix work: one run per folder, clear refusals and errors, graceful
stop on SIGINT/SIGTERM with exact resume, a full disk during a save (issue 19)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import haillm.trainer.checkpoint as ck
from haillm.trainer import train
from haillm.trainer.checkpoint import checkpoints, verify_checkpoint
from haillm.trainer.cli import generate_main, plan_main, train_main
from haillm.trainer.metrics import MetricsLogger
from haillm.trainer.train import GracefulStop
from tests.trainer.ckpt_common import make_corpus, run_cfg

RUN_SETS = ["data.val_fraction=0", "train.precision=fp32", "train.eval_every=0",
            "run.sample_tokens=0", "run.tensorboard=false", "parallel.microbatches=2"]


def cli(corpus, out, *extra):
    """`haillm-train` arguments of the `run_cfg` run (same config, through the CLI)."""
    sets = [a for s in [f"data.corpus={corpus}", *RUN_SETS] for a in ("--set", s)]
    return ["--preset", "micro", *sets, "--out", str(out), *extra]


def steps_of(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def one_error_line(err: str, prog: str = "haillm-train") -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    torch.set_num_threads(1)
    return make_corpus(tmp_path_factory.mktemp("data") / "tokens.bin")


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A finished 6-step run (seed 1234) with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_main(cli(corpus, out, "--steps", "6", "--save-every", "2")) == 0
    return out


# ------------------------------------------------------------------ 3, 4: validation, errors
@pytest.mark.parametrize("argv, msg", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-5"], "--steps must be >= 1, got -5"),
    (["--exit-after", "-1"], "--exit-after must be >= 0, got -1"),
    (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--set", "train.warmup_steps=-1"], "train.warmup_steps must be >= 0, got -1"),
    (["--set", "model.n_heads=0"], "model.n_heads must be >= 1, got 0"),
    (["--set", "train.global_batch=0"], "train.global_batch must be >= 1, got 0"),
    (["--set", "model.hidden_size=0"], "model.hidden_size must be >= 1, got 0"),
    (["--set", "run.keep_checkpoints=-1"], "run.keep_checkpoints must be >= 0, got -1"),
    (["--set", "train.lr=-1"], "train.lr must be >= 0"),
    (["--set", "train.beta2=1.5"], "train.beta2 must be in [0, 1)"),
    (["--set", "data.val_fraction=1"], "data.val_fraction must be in [0, 1)"),
])
def test_out_of_range_values_are_refused_before_any_work(argv, msg, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--preset", "micro", "--out", str(out), *argv]) == 2
    assert msg in one_error_line(capsys.readouterr().err)
    assert not out.exists()  # nothing tokenised, nothing written


def test_user_errors_are_one_line(tmp_path, capsys, corpus):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    assert train_main(["--config", str(bad), "--out", str(tmp_path / "a")]) == 2
    assert "is not valid TOML" in one_error_line(capsys.readouterr().err)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert train_main(["--preset", "micro", "--out", str(afile)]) == 2
    assert "exists and is not a folder" in one_error_line(capsys.readouterr().err)
    assert train_main(["--preset", "micro", "--out", str(afile / "run")]) == 2
    assert "is not writable" in one_error_line(capsys.readouterr().err)
    if not torch.cuda.is_available():
        out = tmp_path / "cuda"
        assert train_main(cli(corpus, out, "--device", "cuda")) == 2
        assert "no CUDA GPU is visible" in one_error_line(capsys.readouterr().err)
        assert not (out / "tokenizer.json").exists() and not (out / "config.toml").exists()
    assert plan_main(["--preset", "micro", "--seq-len", "-4096"]) == 2
    assert "--seq-len must be >= 1, got -4096" in capsys.readouterr().err
    assert plan_main(["--preset", "micro", "--seq-len", "0"]) == 2
    assert "--seq-len must be >= 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------ 1: one run per folder
def test_finished_run_says_where_everything_is(finished):
    assert steps_of(finished) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in checkpoints(finished / "checkpoints")] == [
        "step_00000002", "step_00000004", "step_00000006"]


def test_rerun_into_a_run_folder_is_refused(finished, corpus, capsys):
    before = {p: sha(p) for p in finished.rglob("*") if p.is_file()}
    assert train_main(cli(corpus, finished, "--steps", "3", "--set", "train.seed=99")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "already holds a run (steps 1-6 in metrics.jsonl, checkpoints at step 2, 4, 6" in line
    assert "--resume" in line and "--overwrite" in line and "new --out" in line
    # a different run is refused on --resume, naming the key; nothing was touched
    assert train_main(cli(corpus, finished, "--steps", "6", "--resume",
                          "--set", "train.seed=99")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "belongs to another run: train.seed (1234 saved, 99 now)" in line
    assert "--allow-change train.seed" in line
    assert {p: sha(p) for p in finished.rglob("*") if p.is_file()} == before


def test_overwrite_moves_the_old_run_aside(finished, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    old_model = sha(out / "model.safetensors")
    assert train_main(cli(corpus, out, "--steps", "3", "--set", "train.seed=99",
                          "--overwrite")) == 0
    cap = capsys.readouterr()
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.prev-")]
    assert len(moved) == 1 and "moved the previous run" in cap.err and str(moved[0]) in cap.err
    assert steps_of(moved[0]) == [1, 2, 3, 4, 5, 6]  # the old run, whole
    assert sha(moved[0] / "model.safetensors") == old_model
    assert len(checkpoints(moved[0] / "checkpoints")) == 3
    assert steps_of(out) == [1, 2, 3]  # the new run alone
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step_00000003"]
    assert sha(out / "model.safetensors") != old_model
    # the end-of-run summary line says where everything is
    done = [ln for ln in cap.out.splitlines() if ln.startswith("haillm-train: done:")]
    assert len(done) == 1 and "final train loss" in done[0]
    assert str(out / "model.safetensors") in done[0] and str(out / "metrics.jsonl") in done[0]
    assert "step_00000003" in done[0]


def test_allowed_change_resumes_and_keep_spares_the_newest(finished, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # the newest checkpoint is damaged: the resume takes step 4, and keep=2 must not count
    # the damaged (later) step 6 as newer than the step 5 it saves
    f = sorted((out / "checkpoints" / "step_00000006").glob("*.distcp"))[0]
    f.write_bytes(f.read_bytes()[:-10])
    assert train_main(cli(corpus, out, "--steps", "6", "--resume", "--exit-after", "5",
                          "--set", "run.keep_checkpoints=2", "--set", "train.lr=0.02",
                          "--allow-change", "train.lr")) == 0
    err = capsys.readouterr().err
    assert "refusing checkpoint" in err and "at step 4" in err
    names = [p.name for p in checkpoints(out / "checkpoints")]
    assert names == ["step_00000004", "step_00000005", "step_00000006"], names
    assert steps_of(out) == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------ 2: --resume
def test_resume_with_no_valid_checkpoint_is_refused(finished, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for c in checkpoints(out / "checkpoints"):
        (c / "manifest.json").unlink()
    before = (out / "metrics.jsonl").read_text()
    assert train_main(cli(corpus, out, "--steps", "6", "--resume")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "none of the 3 checkpoints" in line
    for s in (2, 4, 6):
        assert f"step_{s:08d}: incomplete checkpoint (no manifest.json)" in line
    assert (out / "metrics.jsonl").read_text() == before
    # with no checkpoint at all: start fresh, and say so
    fresh = tmp_path / "fresh"
    assert train_main(cli(corpus, fresh, "--steps", "2", "--resume")) == 0
    assert "no checkpoint in" in capsys.readouterr().err and steps_of(fresh) == [1, 2]


# ------------------------------------------------------------------ 4: haillm-generate
def test_generate_refuses_damaged_and_names_the_fallback(finished, tmp_path, capsys):
    from haillm.trainer.data import load_or_train_tokenizer

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "model.safetensors").unlink()
    load_or_train_tokenizer(["def f(x):\n    return x\n" * 20], 512, out / "tokenizer.json")
    newest = out / "checkpoints" / "step_00000006"
    f = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    argv = ["--prompt", "def ", "--max-new-tokens", "2"]
    assert generate_main(["--checkpoint", str(newest), *argv]) == 2
    assert "checksum mismatch" in one_error_line(capsys.readouterr().err, "haillm-generate")
    assert generate_main(["--checkpoint", str(out), *argv]) == 0
    err = capsys.readouterr().err
    assert "refusing checkpoint" in err and "step_00000006" in err
    assert f"using checkpoint {out / 'checkpoints' / 'step_00000004'} (step 4)" in err
    (out / "checkpoints" / "step_00000004" / "manifest.json").write_text("{")
    shutil.rmtree(out / "checkpoints" / "step_00000002")
    assert generate_main(["--checkpoint", str(out), *argv]) == 2
    assert "no complete checkpoint" in one_error_line(capsys.readouterr().err, "haillm-generate")


# ------------------------------------------------------------------ 6: a full disk
def test_disk_full_during_save_keeps_older_checkpoints(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def full_at_4(step, tmp):
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "x.distcp"))

    monkeypatch.setattr(ck, "_fault_point", full_at_4)
    assert train_main(cli(corpus, out, "--steps", "6", "--save-every", "2")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no space left on device while saving {out / 'checkpoints' / 'step_00000004'}" in line
    assert "step_00000002 are intact" in line and "--resume" in line
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step_00000002"]
    verify_checkpoint(out / "checkpoints" / "step_00000002")


def test_disk_full_on_a_real_tmpfs(corpus, tmp_path, capsys):
    """The same on a real 1.2 MB tmpfs (needs root and mount; skipped elsewhere)."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(root)],
                       capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        rc = train_main(cli(corpus, out, "--steps", "6", "--save-every", "2"))
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and "no space left on device while saving" in line, line
        assert "step_00000002 are intact" in line
        assert [p.name for p in checkpoints(root)] == ["step_00000002"]
        verify_checkpoint(root / "step_00000002")
    finally:
        subprocess.run(["umount", str(root)])


# ------------------------------------------------------------------ 5: graceful stop
def test_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    log = []
    with GracefulStop(log=log.append, debounce_s=0.0) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.name == "SIGINT" and "finishing this step" in log[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    with GracefulStop(debounce_s=5.0) as stop:  # a duplicate delivery is not a second signal
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_ctrl_c_in_one_process_saves_and_exits_130(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c_after_2_steps():
        while not (out / "metrics.jsonl").is_file() or len(steps_of(out)) < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_after_2_steps, daemon=True).start()
    assert train_main(cli(corpus, out, "--steps", "200")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SIGINT received: finishing this step" in err
    k = steps_of(out)[-1]
    assert f"stopped at step {k} (SIGINT); saved {out / 'checkpoints'}" in err
    assert verify_checkpoint(checkpoints(out / "checkpoints")[-1])["step"] == k < 200
    assert not (out / "model.safetensors").exists()  # no export: preemption is near
    assert signal.getsignal(signal.SIGINT) is before  # restored


STEPS = 10


def _two_ranks(corpus: str, root: str):
    """Reference run; a run whose rank 1 alone gets SIGINT after step 3; its resume."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    root_p, rank = Path(root), dist.get_rank()
    ref = train(run_cfg(corpus, root_p / "ref", steps=STEPS, dp=2))
    out = root_p / "stop"

    def kill_me_after_3():
        while not (out / "metrics.jsonl").is_file() or \
                len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    if rank == 1:
        threading.Thread(target=kill_me_after_3, daemon=True).start()
    log = io.StringIO()
    stopped = train(run_cfg(corpus, out, steps=STEPS, dp=2), stream=log)
    resumed = train(run_cfg(corpus, out, steps=STEPS, dp=2, extra=["run.resume=true"]))
    return ref["losses"], stopped, resumed["losses"], log.getvalue()


def test_sigint_on_one_rank_stops_both_and_resume_is_exact(corpus, tmp_path):
    from tests.helpers import run_distributed

    res = run_distributed(_two_ranks, 2, corpus, str(tmp_path), timeout=240,
                          start_method="fork")
    ref, stopped, resumed, log = res[0]
    assert res[1][1]["stopped"] == stopped["stopped"] == "SIGINT"
    k = stopped["step"]
    assert 3 <= k < STEPS and res[1][1]["step"] == k  # both ranks stopped after step k
    assert f"haillm-train: stopped at step {k} (SIGINT); saved" in log
    assert stopped["checkpoint"].endswith(f"step_{k:08d}")
    assert stopped["losses"] + resumed == ref  # bit for bit
    assert steps_of(tmp_path / "stop") == list(range(1, STEPS + 1))


def _resume_and_reference(corpus: str, out: str, ref: str):
    torch.set_num_threads(1)
    train(run_cfg(corpus, out, steps=STEPS, dp=2, extra=["run.resume=true"]))
    train(run_cfg(corpus, ref, steps=STEPS, dp=2))


def test_sigterm_to_the_launcher_stops_gracefully_and_resume_is_exact(corpus, tmp_path):
    """SIGTERM to `haillm-train --nproc 2` (what SLURM and Kubernetes send before they
    preempt): the launcher passes it on, the ranks finish the step and save, exit 143; the
    resumed run's metrics equal an uninterrupted run's."""
    from tests.helpers import run_distributed

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "haillm.trainer.cli", "--nproc", "2",
                             "--dp", "2", *cli(corpus, out, "--steps", str(STEPS))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                (out / "metrics.jsonl").is_file() and len(steps_of(out)) >= 2):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    k = verify_checkpoint(checkpoints(out / "checkpoints")[-1])["step"]
    assert f"stopped at step {k} (SIGTERM); saved" in err and "continue with --resume" in err
    assert 2 <= k < STEPS and steps_of(out) == list(range(1, k + 1))
    ref = tmp_path / "ref"
    run_distributed(_resume_and_reference, 2, corpus, str(out), str(ref), timeout=240,
                    start_method="fork")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in recs] == [r["loss"] for r in want]  # bit for bit


# ------------------------------------------------------------------ 7: the console
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_place_on_a_tty_and_eta_from_the_first_step(tmp_path):
    rec = {"loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0, "mfu": 0.1,
           "step_time_s": 1.0}
    tty = _Tty()
    log = MetricsLogger(tmp_path / "a", 10, tensorboard=False, stream=tty)
    for s in (1, 2, 3):
        log.log({**rec, "step": s})
    log.close()
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1  # one line, ended by close()
    assert "ETA 0m09s" in text.split("\r")[1]  # step 1: from its own step time, not 0m00s
    plain = io.StringIO()
    log = MetricsLogger(tmp_path / "b", 10, tensorboard=False, stream=plain)
    for s in (5, 6):  # e.g. after a resume
        log.log({**rec, "step": s})
    log.close()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in plain.getvalue() and "ETA 0m05s" in lines[0]
