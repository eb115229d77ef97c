"""Every layout equals the plain model: the composition test's runs, as a table.

    uv run python benchmarks/trainer_equality.py [--steps 3]

Runs what `tests/trainer/test_composition.py` asserts (the `micro` preset, fp32, 4
micro-batches, a learnable random-walk corpus) and writes the largest relative deviation of
the loss and of the logged gradient norm from the plain single-process `DeepSeekLM` run
(`torch.optim.AdamW`, `clip_grad_norm_`) per layout to `docs/benchmarks/trainer.md`
("Layout equality (fp32)"). The test's bound is RUN_RTOL (tests/helpers.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from harness import write_table  # noqa: E402

import tests.trainer.test_composition as comp  # noqa: E402
from haillm.parallel.testing import run_distributed  # noqa: E402
from haillm.trainer import Config, train  # noqa: E402
from haillm.trainer.config import apply_dict  # noqa: E402
from tests.helpers import RUN_RTOL  # noqa: E402

LAYOUTS = {  # name: (world, dp, tp, pp, sp, extra parallel settings)
    "(1,1,1)": (1, 1, 1, 1, False, {}),
    "(1,1,1) fused ops off": (1, 1, 1, 1, False, comp.OFF),
    "(2,1,1) ZeRO-1": (2, 2, 1, 1, False, {}),
    "(2,1,1) ZeRO off": (2, 2, 1, 1, False, {"zero": False}),
    "(1,2,1) TP+SP": (2, 1, 2, 1, True, {}),
    "(1,2,1) TP, no SP": (2, 1, 2, 1, False, {}),
    "(1,2,1) TP+SP, fused ops off": (2, 1, 2, 1, True, comp.OFF),
    "(1,1,2) 1F1B": (2, 1, 1, 2, False, {}),
    "(1,1,2) interleaved, 2 chunks": (2, 1, 1, 2, False, {"pipeline_schedule": "interleaved",
                                                         "chunks": 2}),
    "(2,2,2) TP+SP, 1F1B, ZeRO-1": (8, 2, 2, 2, True, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    comp.STEPS = a.steps
    tmp = Path(tempfile.mkdtemp(prefix="haillm-eq-"))
    rng = np.random.default_rng(0)
    corpus = tmp / "tokens.bin"
    np.asarray(np.cumsum(rng.integers(-3, 4, size=20000)) % 512, dtype=np.uint16).tofile(corpus)
    want, want_norms = comp._reference_run(comp._cfg_dict(str(corpus), str(tmp / "ref")))
    got = {}
    for world in sorted({v[0] for v in LAYOUTS.values()}):
        named = {k: v for k, v in LAYOUTS.items() if v[0] == world}
        cfgs = []
        for i, (_, dp, tp, pp, sp, extra) in enumerate(named.values()):
            d = comp._cfg_dict(str(corpus), str(tmp / f"w{world}-{i}"), dp, tp, pp, sp)
            d["parallel"].update(extra)
            cfgs.append(d)
        if world == 1:
            res = [comp._losses_and_norms(train(apply_dict(Config(), d, source="bench")),
                                          d["run"]["out"]) for d in cfgs]
        else:
            res = run_distributed(comp._run_layouts, world, cfgs, timeout=600,
                                  start_method="fork")[0]
        got.update(dict(zip(named, res)))
    rows = []
    for name, (losses, norms) in got.items():
        dl = max(abs(x - y) / abs(y) for x, y in zip(losses, want))
        dn = max(abs(x - y) / abs(y) for x, y in zip(norms, want_norms))
        rows.append([name, f"{dl:.1e}", f"{dn:.1e}", "yes" if max(dl, dn) <= RUN_RTOL else "NO"])
        print(rows[-1], flush=True)
    notes = (f"The `micro` preset, fp32, {a.steps} steps of 4 micro-batches, every layout "
             "against one process running the plain `DeepSeekLM` (reference attention, "
             "`torch.optim.AdamW`, `clip_grad_norm_`) on the whole global batch: the largest "
             "relative deviation per step of the training loss and of the logged global "
             f"gradient norm (before clipping). Bound: RUN_RTOL = {RUN_RTOL:g} "
             "(`tests/trainer/test_composition.py` asserts it).")
    print(write_table("trainer.md", "Layout equality (fp32)",
                      ["layout (dp, tp, pp)", "max rel. loss deviation",
                       "max rel. grad-norm deviation", f"within {RUN_RTOL:g}"], rows, notes))


if __name__ == "__main__":
    main()
