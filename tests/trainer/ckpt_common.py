"""Shared helpers of the checkpoint tests: a learnable token stream and small run configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from haillm.trainer import load_config


def make_corpus(path: Path) -> str:
    """A random walk over a 512-token vocabulary (learnable, so losses move)."""
    rng = np.random.default_rng(0)
    np.asarray(np.cumsum(rng.integers(-3, 4, size=20000)) % 512, dtype=np.uint16).tofile(path)
    return str(path)


def run_cfg(corpus: str, out, *, steps=6, dp=1, tp=1, pp=1, precision="fp32", extra=()):
    """The `micro` preset on `corpus`, fp32, no eval and no sample, 2 micro-batches."""
    return load_config("micro", overrides=[
        f"data.corpus={corpus}", "data.val_fraction=0", f"run.out={out}",
        f"train.steps={steps}", f"train.precision={precision}", "train.eval_every=0",
        "run.sample_tokens=0", "run.tensorboard=false", "parallel.microbatches=2",
        f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", *extra])
