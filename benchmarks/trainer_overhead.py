"""The trainer's cost at (1, 1, 1): against the previous trainer, and against a plain loop.

    OMP_NUM_THREADS=1 uv run python benchmarks/trainer_overhead.py [--steps 30] [--rounds 3]
        [--baseline-rev 7384137]

Three ways to run the same training steps (the `tiny` preset, fp32, one process, one
thread, 4 micro-batches of the same global batches), measured in one run, interleaved
round by round so that a change of machine load hits all three alike:

* **previous trainer**: the trainer before the composition redesign (issue 15: `StageModel`,
  its own `Grid`/`Ops`/`layout_map`), the packages of git revision `--baseline-rev`, exported
  to a temporary folder and run in a subprocess with those sources on `PYTHONPATH`;
* **trainer**: `haillm-train` of this checkout, the same way (a subprocess each round);
* **plain loop**: the same `DeepSeekLM` with the same fused ops (`parallelize` steps 1-6 only:
  no ZeRO buffers, no pipeline executor, no metrics), and a loop written as one would by hand:
  forward + backward per micro-batch, `clip_grad_norm_`, `haillm.fusedops.FusedAdamW`.

The step time of the trainers is their own `step_time_s` (metrics.jsonl); the plain loop times
the same span (data to device -> optimizer step). Medians over the steps after the first
quarter of every round, then the median over rounds. Writes the table to
`docs/benchmarks/trainer.md` ("Trainer overhead at (1, 1, 1)").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from harness import device_name, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flashattn", "fusedops", "parallel", "pipeline", "zero", "trainer")


def _overrides(steps: int, corpus: Path) -> list[str]:
    return [f"train.steps={steps}", "train.precision=fp32", "train.eval_every=0",
            "run.sample_tokens=0", "run.tensorboard=false", "parallel.microbatches=4",
            f"train.warmup_steps={max(steps // 5, 1)}", f"data.corpus={corpus}",
            "run.save_every=0"]


def _export(rev: str, dest: Path) -> Path:
    """The packages' sources at `rev` under `dest` (git archive: no checkout touched)."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "packages"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest


def _run_trainer(src: Path, steps: int, corpus: Path, out: Path) -> list[float]:
    """Step times (s) of one `haillm-train` run whose packages come from `src`."""
    path = os.pathsep.join(str(src / "packages" / p / "src") for p in PACKAGES)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    code = ("import sys; from haillm.trainer.cli import train_main; "
            "sys.exit(train_main(sys.argv[1:]))")
    args = [sys.executable, "-c", code, "--preset", "tiny", "--out", str(out), "--overwrite"]
    for o in _overrides(steps, corpus):
        args += ["--set", o]
    subprocess.run(args, check=True, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in recs]


def _plain_loop(steps: int, corpus: Path) -> list[float]:
    """The same steps as a hand-written loop over the same model and ops."""
    from haillm.fusedops import FusedAdamW
    from haillm.parallel import ParallelDims
    from haillm.trainer import DeepSeekLM, load_config, lr_at, parallelize
    from haillm.trainer.data import PackedDataset, Sampler

    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=_overrides(steps, corpus))
    m, t, p = cfg.model, cfg.train, cfg.parallel
    model = parallelize(DeepSeekLM(m, seed=t.seed, lazy=True), ParallelDims().build(), cfg,
                        data_parallel=False)[0]
    import numpy as np

    ds = PackedDataset(np.fromfile(corpus, dtype=np.uint16), m.seq_len, cfg.data.val_fraction)
    decay = [q for n, q in model.named_parameters() if not n.endswith("norm.weight")]
    rest = [q for n, q in model.named_parameters() if n.endswith("norm.weight")]
    opt = FusedAdamW([{"params": decay, "weight_decay": t.weight_decay},
                      {"params": rest, "weight_decay": 0.0}], lr=t.lr,
                     betas=(t.beta1, t.beta2), eps=t.eps)
    sampler = Sampler(ds.n_train, t.global_batch, t.seed)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = sampler.next_global()
        micro = Sampler.shard(idx, 1, 0, p.microbatches)
        for mb in micro:
            x, y = ds.batch(mb)
            (model(x, y) / p.microbatches).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def _steady(xs: list[float]) -> tuple[float, float]:
    """(median, fastest) of the steps after the first quarter: the median is what a run
    sees, the fastest step what the code costs when no other job interferes."""
    rest = xs[max(len(xs) // 4, 1):]
    return statistics.median(rest), min(rest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-rev", default="7384137")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="haillm-overhead-"))
    # a pre-tokenised learnable stream: no tokenizer training in the timed runs
    import numpy as np

    corpus = tmp / "tokens.bin"
    rng = np.random.default_rng(0)
    np.asarray(np.cumsum(rng.integers(-3, 4, size=400_000)) % 4096,
               dtype=np.uint16).tofile(corpus)
    old = _export(a.baseline_rev, tmp / "old")
    results: dict[str, list[tuple[float, float]]] = {"previous trainer": [], "trainer": [],
                                                      "plain loop": []}
    for r in range(a.rounds):
        results["previous trainer"].append(_steady(_run_trainer(old, a.steps, corpus,
                                                                tmp / f"old{r}")))
        results["trainer"].append(_steady(_run_trainer(ROOT, a.steps, corpus, tmp / f"new{r}")))
        results["plain loop"].append(_steady(_plain_loop(a.steps, corpus)))
        print({k: f"{1000 * v[-1][0]:.1f} / {1000 * v[-1][1]:.1f} ms" for k, v in
               results.items()}, flush=True)
    med = {k: statistics.median(x for x, _ in v) for k, v in results.items()}
    best = {k: min(b for _, b in v) for k, v in results.items()}
    from haillm.trainer import load_config

    cfg = load_config("tiny")
    tokens = cfg.train.global_batch * cfg.model.seq_len
    rows = []
    for k, v in med.items():
        b = best[k]
        rows.append([k, f"{1000 * v:.1f}", f"{tokens / v:,.0f}", f"{v / med['plain loop']:.3f}",
                     f"{1000 * b:.1f}", f"{b / best['trainer']:.3f}",
                     f"{b / best['plain loop']:.3f}",
                     ", ".join(f"{1000 * x:.0f}" for x, _ in results[k])])
    notes = (f"`tiny` preset ({cfg.model.n_params() / 1e6:.2f}M parameters, {tokens} tokens "
             f"per step in 4 micro-batches), fp32, one process, one thread, {a.steps} steps per "
             f"round, {a.rounds} rounds interleaved (previous, trainer, plain): the median over "
             "rounds of each round's median steady step, and the fastest steady step of all "
             "rounds (the cost of the code when no other job interferes; the machine is shared, "
             "so single rounds vary by 10-20 %). "
             f"Previous trainer: the packages at `{a.baseline_rev}`. Plain loop: "
             "the same model and fused ops by hand (forward/backward per micro-batch, "
             "clip_grad_norm_, FusedAdamW), no ZeRO buffers, pipeline executor or metrics. "
             f"Machine: {device_name()}, shared with other jobs.")
    print(write_table("trainer.md", "Trainer overhead at (1, 1, 1)",
                      ["run", "median step ms", "tokens/s", "median / plain loop",
                       "fastest step ms", "fastest / trainer", "fastest / plain loop",
                       "round medians (ms)"], rows, notes))


if __name__ == "__main__":
    main()
