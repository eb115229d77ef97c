"""The fused-feature switches switch: a real forward + backward through the trainer's model.

`parallelize`'s first transform sets every module's implementation from the config, and the
model (`DeepSeekLM`) calls the packages' functions. Here every such function is wrapped with a
call counter where it is looked up (the module globals of `haillm.trainer.*` and of the
packages' own modules, e.g. the `RMSNorm` module's `rms_norm`), the model is built as
`train.py` builds it, one micro step runs forward and backward, and the calls are compared
with what the config asks for: a switch that is ignored, crossed with another or bypassed by
the model changes the counts.
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
from haillm.parallel import ParallelDims
from haillm.trainer import DeepSeekLM, ParallelConfig, load_config, parallelize
from haillm.trainer.parallelize import ATTENTION_IMPLS

N_LAYERS = 2
# (tp_comm_overlap acts only at tp > 1, inside haillm.parallel's layers: not seen at tp = 1)
OFF = dict(fused_norm=False, fused_swiglu=False, fused_cross_entropy=False,
           attention="reference", tp_comm_overlap=False)
# the functions the trainer may call, by the name it imports them under
WATCHED = ("rms_norm", "linear_swiglu", "inplace_cross_entropy", "cross_entropy_reference",
           "flash_attention")
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
    want = collections.Counter({
        # two norms per block (the second, and the first from block 1 on, with the residual
        # add) and the final one
        ("rms_norm", "auto" if p.fused_norm else "reference"): 2 * L + 1,
        ("flash_attention", ATTENTION_IMPLS[p.attention]): L,
        ("inplace_cross_entropy" if p.fused_cross_entropy else "cross_entropy_reference",
         None): 1,
    })
    if p.fused_swiglu:  # off: the plain GEMM then silu * up, no package call
        want["linear_swiglu", "auto"] = L
    return want


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
               if n.split(".")[:2] in (["haillm", "trainer"], ["haillm", "fusedops"],
                                       ["haillm", "flashattn"])]
    patched = set()
    for mod in modules:
        for attr, value in list(vars(mod).items()):
            for name, fn in originals.items():
                if value is fn:
                    monkeypatch.setattr(mod, attr, wrapped[name])
                    patched.add(name)
    # a rename would silently count nothing
    assert patched == set(WATCHED), set(WATCHED) - patched
    return counter


def _micro_step(p: ParallelConfig):
    """Build the one-stage model as train.py does (a seeded lazy DeepSeekLM through
    `parallelize`) and run forward + backward of one micro-batch."""
    cfg = load_config("micro", overrides=[f"model.n_layers={N_LAYERS}", "train.precision=fp32"])
    cfg.parallel = p
    m = cfg.model
    torch.manual_seed(0)
    chunks = parallelize(DeepSeekLM(m, seed=0, lazy=True), ParallelDims().build(), cfg,
                         data_parallel=False)
    tokens = torch.randint(0, m.vocab_size, (2, m.seq_len + 1))
    loss = chunks[0](tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    for name, w in chunks[0].named_parameters():
        assert w.grad is not None and torch.isfinite(w.grad).all(), name
        assert w.grad.abs().sum() > 0, name
    return chunks


@pytest.mark.parametrize("switches", list(CASES.values()), ids=list(CASES))
def test_switches_select_the_functions_that_run(switches, calls):
    p = ParallelConfig(**switches)
    chunks = _micro_step(p)
    assert calls == _expected_calls(p), f"{switches}: {dict(calls)}"
    # the start-up wiring the trainer prints names what ran
    wiring = chunks.wiring
    assert ("impl=reference" in wiring["rms_norm"]) is (not p.fused_norm)
    assert wiring["swiglu"].startswith("haillm.fusedops.linear_swiglu") is p.fused_swiglu
    assert wiring["attention"] == ("haillm.flashattn.flash_attention "
                                   f"(impl={ATTENTION_IMPLS[p.attention]})")
    assert wiring["cross_entropy"] == ("haillm.fusedops.inplace_cross_entropy"
                                       if p.fused_cross_entropy
                                       else "haillm.fusedops.cross_entropy_reference")


def test_every_switch_is_covered():
    """A new fused switch in ParallelConfig must get a case above."""
    switches = {f.name for f in dataclasses.fields(ParallelConfig)
                if f.name.startswith("fused_") or f.name == "attention"}
    covered = {k for case in CASES.values() for k in case}
    assert switches <= covered, switches - covered
