"""Peak memory of building one pipeline stage of DeepSeek-7B (bf16, one process, CPU).

    uv run python benchmarks/trainer_stage_memory.py [--pp 4] [--stage 1]

`parallelize`'s steps 5 and 6 (pipeline split, values) on a lazy `DeepSeekLM`: the stage's
own parameters are drawn one full fp32 tensor at a time and kept in bf16, nothing of the
other stages is allocated. Measured as the peak RSS growth of a fresh process
(`harness.peak_memory_subprocess`), next to the stage's own bf16 bytes and the largest single
fp32 tensor it draws; writes "Building one 7B stage" in `docs/benchmarks/trainer.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import peak_memory_subprocess, write_table  # noqa: E402


def _setup(pp: int, stage: int):
    from haillm.parallel import ParallelDims
    from haillm.trainer import DeepSeekLM, load_config

    cfg = load_config("deepseek-7b")
    return cfg, ParallelDims(pp=pp, world_size=pp, rank=stage), DeepSeekLM(cfg.model, seed=0,
                                                                         lazy=True)


def _build(state) -> None:
    import torch

    from haillm.trainer.parallelize import materialize, split_pipeline

    cfg, dims, model = state
    _, local = split_pipeline(model, dims, cfg.parallel)
    materialize(local, dims, dtype=torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--stage", type=int, default=1)
    a = ap.parse_args()
    import torch

    from haillm.trainer import load_config
    from haillm.trainer.parallelize import split_layers
    from haillm.trainer.shard_plan import param_specs

    m = load_config("deepseek-7b").model
    layers = split_layers(m.n_layers, a.pp)[a.stage]
    specs = param_specs(m)
    mine = [s for n, s in specs.items() if n.startswith(tuple(f"layers.{i}." for i in layers))
            or (a.stage == 0 and n == "embed.weight")
            or (a.stage == a.pp - 1 and n in ("norm.weight", "head.weight"))]
    own = sum(torch.Size(s.shape).numel() for s in mine) * 2
    largest = max(torch.Size(s.shape).numel() for s in mine) * 4
    peak = peak_memory_subprocess(_setup, _build, a.pp, a.stage, timeout=1800)
    gib = 2.0**30
    rows = [[f"stage {a.stage} of {a.pp} ({len(layers)} layers)", f"{own / gib:.2f}",
             f"{largest / gib:.2f}", f"{peak / gib:.2f}", f"{peak / own:.2f}"]]
    notes = ("DeepSeek-7B widths, bf16, one process on CPU: `split_pipeline` + `materialize` "
             "on a lazy (meta) `DeepSeekLM`. Peak = RSS growth of the build in a fresh "
             "process. The bound the design promises: the stage's own bf16 weights plus one "
             "full fp32 tensor being drawn (the whole fp32 model would be 27.6 GB).")
    print(write_table("trainer.md", "Building one 7B stage",
                      ["stage", "own bf16 weights GiB", "largest fp32 tensor GiB",
                       "peak RSS growth GiB", "peak / own"], rows, notes))


if __name__ == "__main__":
    main()
