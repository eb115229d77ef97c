"""The fused-feature switches switch: a real forward + backward through the trainer's model.

The trainer builds its operations once (`haillm.trainer.ops.Ops`) from the package functions
it imported, and its model (`haillm.trainer.model.StageModel`) calls them. Here every such
function is wrapped with a call counter where the trainer looks it up (the module globals of
`haillm.trainer.*`, and the packages' own namespaces in case a trainer module reaches for
`haillm.fusedops.rms_norm` directly), the model is built as `train.py` builds it, one micro
step runs forward and backward, and the calls are compared with what the config asks for: a
switch that is ignored, crossed with another or bypassed by the model changes the counts.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys

import pytest
import torch

import haillm.flashattn
import haillm.fusedops
from haillm.trainer import DeepSeekLM, ParallelConfig, StageModel, load_config
from haillm.trainer.grid import Grid
from haillm.trainer.ops import Ops

N_LAYERS = 2
# (tp_comm_overlap acts only at tp > 1, inside haillm.parallel's layers: not seen at tp = 1)
OFF = dict(fused_norm=False, fused_swiglu=False, fused_cross_entropy=False,
           attention="reference", tp_comm_overlap=False)
# the functions the trainer may call, by the name it imports them under
WATCHED = ("rms_norm", "rms_norm_reference", "linear_swiglu", "inplace_cross_entropy",
           "cross_entropy_reference", "flash_attention")
CASES = {
    "all on (defaults)": {},
    "all off": OFF,
    "attention tiled": {"attention": "tiled"},
    "fused_norm off": {"fused_norm": False},
    "fused_swiglu off": {"fused_swiglu": False},
    "fused_cross_entropy off": {"fused_cross_entropy": False},
    "attention reference": {"attention": "reference"},
}


def _expected_calls(p: ParallelConfig) -> collections.Counter:
    """What one forward of an N_LAYERS model at tp = 1 calls, for the switches of `p`."""
    L = N_LAYERS
    return collections.Counter({
        # two norms per block (the second, and the first from block 1 on, with the residual
        # add) and the final one
        ("rms_norm" if p.fused_norm else "rms_norm_reference", None): 2 * L + 1,
        ("linear_swiglu", None if p.fused_swiglu else "reference"): L,
        ("flash_attention", p.attention): L,
        ("inplace_cross_entropy" if p.fused_cross_entropy else "cross_entropy_reference",
         None): 1,
    })


@pytest.fixture
def calls(monkeypatch) -> collections.Counter:
    """Counts (function name, impl keyword or None) of every call of a WATCHED function made
    through the trainer's modules or the packages' namespaces."""
    counter: collections.Counter = collections.Counter()
    originals = {name: getattr(haillm.fusedops if hasattr(haillm.fusedops, name)
                               else haillm.flashattn, name) for name in WATCHED}

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counter[name, kwargs.get("impl")] += 1
            return fn(*args, **kwargs)
        return wrapper

    wrapped = {name: counting(name, fn) for name, fn in originals.items()}
    modules = [m for n, m in list(sys.modules.items())
               if n == "haillm.trainer" or n.startswith("haillm.trainer.")]
    for mod in [*modules, haillm.fusedops, haillm.flashattn]:
        for attr, value in list(vars(mod).items()):
            for name, fn in originals.items():
                if value is fn:
                    monkeypatch.setattr(mod, attr, wrapped[name])
    # the trainer's ops module imports every one of them: a rename would silently count nothing
    ops_mod = sys.modules["haillm.trainer.ops"]
    assert all(getattr(ops_mod, n) is wrapped[n] for n in WATCHED)
    return counter


def _micro_step(p: ParallelConfig) -> StageModel:
    """Build the one-stage model as train.py does (Ops from the parallel config, a seeded
    reference, lazy, StageModel with both ends) and run forward + backward of one
    micro-batch."""
    m = load_config("micro", overrides=[f"model.n_layers={N_LAYERS}"]).model
    torch.manual_seed(0)
    ops = Ops(p, warn=False)
    ref = DeepSeekLM(m, seed=0, lazy=True)
    stage = StageModel(ref, range(m.n_layers), Grid.create(1, 1, 1), ops, first=True,
                       last=True, sequence_parallel=p.sequence_parallel, dtype=torch.float32)
    tokens = torch.randint(0, m.vocab_size, (2, m.seq_len + 1))
    loss = stage(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    for name, w in stage.named_parameters():
        assert w.grad is not None and torch.isfinite(w.grad).all(), name
        assert w.grad.abs().sum() > 0, name
    return stage


@pytest.mark.parametrize("switches", list(CASES.values()), ids=list(CASES))
def test_switches_select_the_functions_that_run(switches, calls):
    p = ParallelConfig(**switches)
    stage = _micro_step(p)
    assert calls == _expected_calls(p), f"{switches}: {dict(calls)}"
    # the start-up wiring the trainer prints names what ran
    wiring = stage.ops.wiring
    assert wiring["rms_norm"].startswith(
        "haillm.fusedops.rms_norm " if p.fused_norm else "haillm.fusedops.rms_norm_reference ")
    assert ("impl=reference" in wiring["swiglu"]) is (not p.fused_swiglu)
    assert wiring["attention"] == f"haillm.flashattn.flash_attention (impl={p.attention})"
    assert wiring["cross_entropy"] == ("haillm.fusedops.inplace_cross_entropy"
                                       if p.fused_cross_entropy
                                       else "haillm.fusedops.cross_entropy_reference")


def test_every_switch_is_covered():
    """A new fused switch in ParallelConfig must get a case above."""
    switches = {f.name for f in dataclasses.fields(ParallelConfig)
                if f.name.startswith("fused_") or f.name == "attention"}
    covered = {k for case in CASES.values() for k in case}
    assert switches <= covered, switches - covered
