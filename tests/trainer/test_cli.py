"""`haillm-train`: a bf16 run that learns, its files (metrics.jsonl, config.toml), its errors."""

from __future__ import annotations

import json
import math

import pytest

from haillm.trainer import Config, load_config
from haillm.trainer.cli import generate_main, plan_main, train_main

COMMON = ["--preset", "micro", "--set", "data.max_corpus_mb=0.2", "--set", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = train_main([*COMMON, "--steps", "24", "--precision", "bf16", "--out", str(out),
                     "--set", "train.eval_every=12", "--set", "train.warmup_steps=3"])
    return rc, out


def test_bf16_run_reduces_the_loss(bf16_run, capsys):
    rc, out = bf16_run
    assert rc == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5, losses
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < losses[0]


def test_metrics_jsonl_and_config_toml_follow_the_contract(bf16_run):
    rc, out = bf16_run
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 25))  # one object per optimizer step
    for r in recs:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "comm_s",
                    "compute_s"):
            assert isinstance(r[key], (int, float)), key
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0
    cfg = load_config(file=out / "config.toml")  # the resolved config reads back
    assert isinstance(cfg, Config) and cfg.train.steps == 24 and cfg.train.precision == "bf16"
    assert cfg.run.out == str(out) and cfg.data.max_corpus_mb == 0.2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "tinny"], "unknown preset 'tinny' (did you mean 'tiny'?)"),
    (["--preset", "micro", "--nproc", "4", "--dp", "3"], "does not match the world size 4"),
    (["--preset", "micro", "--nproc", "3", "--tp", "3"], "n_heads (4) must be divisible by tp (3)"),
    (["--preset", "micro", "--nproc", "6", "--pp", "6", "--dp", "1"],
     "n_layers (4) must be >= the number of pipeline"),
    (["--preset", "micro", "--set", "data.corpus=/no/such/corpus.txt"],
     "'/no/such/corpus.txt' does not exist"),
    (["--preset", "micro", "--set", "train.lrr=0.1"], "did you mean 'train.lr'?"),
    (["--config", "/no/such.toml"], "no such file"),
])
def test_cli_errors_are_clear(argv, msg, capsys, tmp_path):
    assert train_main([*argv, "--out", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err


def test_generate_and_plan_entry_points(capsys):
    with pytest.raises(SystemExit):  # --checkpoint and --prompt are required
        generate_main([])
    assert "--checkpoint" in capsys.readouterr().err
    assert plan_main(["--preset", "micro"]) == 0
    assert "activations GiB" in capsys.readouterr().out


def test_nproc_launches_ranks_through_torch_elastic(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_main([*COMMON, "--nproc", "2", "--tp", "2", "--steps", "2", "--out", str(out),
                     "--set", "run.sample_tokens=4", "--set", "train.eval_every=0"])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    assert load_config(file=out / "config.toml").parallel.tp == 2


@pytest.mark.parametrize("zero", ["true", "false"])
def test_fp16_run_with_loss_scaling(tmp_path, zero):
    out = tmp_path / "fp16"
    rc = train_main([*COMMON, "--steps", "6", "--precision", "fp16", "--out", str(out),
                     "--set", "train.eval_every=0", "--set", "run.sample_tokens=0",
                     "--set", f"parallel.zero={zero}"])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_scale"] > 1 for r in recs)  # the dynamic loss scale is logged
    applied = [r for r in recs if not r["skipped"]]
    assert applied and all(math.isfinite(r["loss"]) for r in applied)
    assert recs[-1]["loss"] < recs[0]["loss"]
