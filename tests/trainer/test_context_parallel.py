"""Context parallelism in the trainer (issue 16): `--cp N` computes the same training run.

In fp32 with deterministic data, the layouts with cp = 2 (alone, with ZeRO off, with the
fused ops off, with dp = 2, with tp = 2 and sequence parallelism, with pp = 2 under 1F1B and
interleaved 1F1B) log the losses, the global gradient norms and the validation loss of the
(1, 1, 1) run within RUN_RTOL per step (the composition test proves (1, 1, 1) equal to plain
PyTorch); a checkpoint saved at cp = 2 resumes at cp = 1 and one saved at cp = 1 resumes at
cp = 2, continuing the uninterrupted run; layouts that cannot work are refused, saying why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from haillm.trainer import Config, ConfigError, load_config, train
from haillm.trainer.config import apply_dict
from tests.helpers import RUN_RTOL, assert_close, run_distributed
from tests.trainer.ckpt_common import make_corpus, run_cfg
from tests.trainer.test_composition import OFF, _cfg_dict

STEPS = 3


def _cfg(corpus: str, out: Path, *, dp=1, tp=1, pp=1, cp=1, **parallel) -> dict:
    """test_composition's config (micro, fp32, 4 micro-batches, grad clipping), with cp and a
    validation loss after the last step (so that `evaluate` is compared too)."""
    d = _cfg_dict(corpus, str(out), dp, tp, pp, sp=True)
    d["parallel"].update(cp=cp, **parallel)
    d["data"]["val_fraction"] = 0.05
    d["train"]["eval_every"] = STEPS
    return d


def _record(summary: dict, out: str) -> dict:
    recs = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"loss": summary["losses"], "grad_norm": [r["grad_norm"] for r in recs],
            "val_loss": [v for _, v in summary["val_losses"]]}


def _check_model(cp_rank_expected: list[int]) -> None:
    """On a cp = world group: the RoPE positions of this rank are its zigzag chunks, and the
    CP model's local losses average to the single-process model's loss."""
    import torch.distributed as dist

    from haillm.parallel import ParallelDims, split_sequence
    from haillm.trainer import DeepSeekLM, parallelize

    world = dist.get_world_size()
    # init std 0.3 rather than 0.006: attention far from uniform, so positions matter
    # (the fused cross-entropy and norm kernels have no float64 path: PyTorch's here)
    cfg = load_config("micro", overrides=["train.precision=fp32", f"parallel.cp={world}",
                                          "parallel.attention=tiled", "model.init_std=0.3",
                                          "parallel.fused_cross_entropy=false",
                                          "parallel.fused_norm=false"])
    dims = ParallelDims(cp=world).build()
    m, seq = cfg.model, cfg.model.seq_len
    chunks = parallelize(DeepSeekLM(m, seed=7, lazy=True), dims, cfg, data_parallel=False)
    pos = chunks[0].positions(seq // world)
    assert pos.tolist() == cp_rank_expected[dims.cp_rank], pos.tolist()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, m.vocab_size, (2, seq), generator=g) for _ in range(2))
    # in float64, so that only the summation orders differ (the ring's blocks, the split
    # cross-entropy mean): the table's float64 tolerance, not an fp32 guess
    with torch.no_grad():
        whole = DeepSeekLM(m, seed=7).double()(x, y)
        mine = chunks[0].double()(split_sequence(x, group=dims.cp_group),
                                  split_sequence(y, group=dims.cp_group))
        dist.all_reduce(mine, group=dims.cp_group)
    assert mine.dtype == torch.float64
    assert_close(mine / world, whole)


def _run_layouts(cfgs: list[dict], check_model: list | None = None) -> list | None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if check_model is not None:
        _check_model(check_model)
    out = []
    for d in cfgs:
        s = train(apply_dict(Config(), d, source="test"))
        out.append(_record(s, d["run"]["out"]) if dist.get_rank() == 0 else None)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "tokens.bin")


def test_context_parallel_layouts_match_single_process(corpus, tmp_path):
    ref = _record(train(apply_dict(Config(), _cfg(corpus, tmp_path / "111"), source="t")),
                  str(tmp_path / "111"))
    # a comparison that can fail: every step changes the loss and the gradient norm by far
    # more than RUN_RTOL (a layout that garbled positions, the loss mean or an update shows)
    assert all(abs(b - a) > 1e-2 * a for a, b in zip(ref["grad_norm"], ref["grad_norm"][1:]))
    assert all(a != b for a, b in zip(ref["loss"], ref["loss"][1:])) and ref["val_loss"]
    runs = {2: {"cp=2": dict(cp=2),
                "cp=2 ZeRO off": dict(cp=2, zero=False),
                "cp=2 fused ops off (reference attention blocks)": dict(cp=2, **OFF)},
            4: {"dp=2 cp=2 ZeRO-1 over dp x cp": dict(dp=2, cp=2),
                "cp=2 tp=2 SP": dict(cp=2, tp=2),
                "cp=2 pp=2 1F1B": dict(cp=2, pp=2),
                "cp=2 pp=2 interleaved, 2 chunks": dict(cp=2, pp=2,
                                                        pipeline_schedule="interleaved",
                                                        chunks=2)}}
    # micro: seq_len 16, cp 2: rank 0 holds chunks 0 and 3 of 4, rank 1 chunks 1 and 2
    zigzag = [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    got = {}
    for world, named in runs.items():
        cfgs = [_cfg(corpus, tmp_path / f"w{world}-{i}", **kw)
                for i, kw in enumerate(named.values())]
        res = run_distributed(_run_layouts, world, cfgs, zigzag if world == 2 else None,
                              timeout=300, start_method="fork")[0]
        got.update(dict(zip(named, res)))
    for lay, rec in got.items():
        for key in ("loss", "grad_norm", "val_loss"):
            assert len(rec[key]) == len(ref[key]), (lay, key)
            np.testing.assert_allclose(rec[key], ref[key], rtol=RUN_RTOL,
                                       err_msg=f"{key}, layout {lay}")


# ------------------------------------------------------------------------ checkpoints
FULL, STOP = 5, 3


def _copy_checkpoint(src: Path, dst: Path) -> None:
    name = f"step_{STOP:08d}"
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


def _norms_after_stop(out: Path) -> list[float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in recs if r["step"] > STOP]


def _cp2_runs(corpus: str, root: str):
    """At cp = 2: run b stops after STOP (saving); run a2 resumes a cp = 1 checkpoint."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    r = Path(root)
    train(run_cfg(corpus, r / "b", steps=FULL, extra=["parallel.cp=2",
                                                     f"run.exit_after={STOP}"]))
    a2 = train(run_cfg(corpus, r / "a2", steps=FULL, extra=["parallel.cp=2",
                                                           "run.resume=true"]))
    return a2["losses"] if dist.get_rank() == 0 else None


def test_checkpoint_resumes_across_cp(corpus, tmp_path):
    full = train(run_cfg(corpus, tmp_path / "full", steps=FULL))["losses"]
    train(run_cfg(corpus, tmp_path / "a", steps=FULL, extra=[f"run.exit_after={STOP}"]))
    _copy_checkpoint(tmp_path / "a", tmp_path / "a2")
    a2 = run_distributed(_cp2_runs, 2, corpus, str(tmp_path), timeout=300,
                         start_method="fork")[0]
    man = json.loads((tmp_path / f"b/checkpoints/step_{STOP:08d}/manifest.json").read_text())
    assert man["layout"]["cp"] == 2 and man["layout"]["world"] == 2
    b1 = train(run_cfg(corpus, tmp_path / "b", steps=FULL, extra=["run.resume=true"]))["losses"]
    assert len(full) == FULL and full[-1] != full[STOP]
    want_norms = _norms_after_stop(tmp_path / "full")
    for name, losses in (("cp=1 -> cp=2", a2), ("cp=2 -> cp=1", b1)):
        np.testing.assert_allclose(losses, full[STOP:], rtol=RUN_RTOL, err_msg=name)
    for run in ("a2", "b"):
        np.testing.assert_allclose(_norms_after_stop(tmp_path / run), want_norms,
                                   rtol=RUN_RTOL, err_msg=f"grad norm, {run}")


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("overrides,world,match", [
    (["parallel.cp=2"], 4, r"layout dp\*cp\*tp\*pp = 1\*2\*1\*1 = 2 does not match the world "
                           r"size 4; pass --nproc 2"),
    (["parallel.cp=3"], 3, r"seq_len \(16\) must be divisible by 2\*cp = 6 under context "
                           r"parallelism \(the zigzag layout"),
    (["parallel.cp=2", "model.seq_len=18"], 2, r"divisible by 2\*cp = 4"),
    (["parallel.cp=2", "parallel.tp=4", "model.n_kv_heads=4", "model.seq_len=20"], 8,
     r"seq_len \(20\) must be divisible by cp\*tp = 8 under context and sequence parallelism"),
    (["parallel.cp=0"], None, r"parallel.cp must be >= 1, got 0"),
])
def test_bad_context_parallel_layouts_are_refused(overrides, world, match):
    cfg = load_config("micro", overrides=overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.validate(world)


def test_cp_layouts_that_fit_validate():
    # SP inside a CP shard needs S/cp divisible by tp, not S by 2*cp*tp: 20 = 2*cp*5 works
    # at cp = 2 with tp = 2 (each CP rank's 10 tokens, 5 per TP rank), without SP at tp = 4
    load_config("micro", overrides=["parallel.cp=2", "parallel.tp=2",
                                    "model.seq_len=20"]).validate(4)
    load_config("micro", overrides=["parallel.cp=2", "parallel.tp=4", "model.n_kv_heads=4",
                                    "model.seq_len=20", "parallel.sequence_parallel=false"]
                ).validate(8)


def test_cli_cp_flag():
    from haillm.trainer.cli import build_config, train_parser

    ap = train_parser()
    cfg = build_config(ap.parse_args(["--preset", "micro", "--cp", "2", "--nproc", "8",
                                      "--tp", "2"]))
    assert (cfg.parallel.cp, cfg.parallel.tp, cfg.parallel.dp) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"--nproc 6 is not divisible by cp\*tp\*pp = 2\*2\*1"):
        build_config(ap.parse_args(["--preset", "micro", "--cp", "2", "--tp", "2",
                                    "--nproc", "6"]))
    with pytest.raises(ConfigError, match="--cp must be >= 1, got 0"):
        build_config(ap.parse_args(["--preset", "micro", "--cp", "0"]))
