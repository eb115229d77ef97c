"""One `impl=` vocabulary and one policy for every op (docs/architecture.md).

reference / torch / triton / auto; an explicit choice that cannot run raises and names the
impls that can; auto chooses (the PyTorch path on CPU, silently: nothing was asked for).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import haillm.fusedops._dispatch as dispatch
from haillm.flashattn import flash_attention
from haillm.fusedops import (
    adamw_step_,
    inplace_cross_entropy,
    layer_norm,
    linear_residual,
    linear_swiglu,
    rms_norm,
)


def _ops():
    x = torch.randn(3, 8)
    w = torch.randn(10, 8)
    q = torch.randn(1, 5, 2, 8)
    return {
        "layer_norm": lambda impl: layer_norm(x, torch.ones(8), torch.zeros(8), impl=impl),
        "rms_norm": lambda impl: rms_norm(x, torch.ones(8), impl=impl),
        "adamw_step_": lambda impl: adamw_step_(
            torch.ones(8), torch.ones(8), torch.zeros(8), torch.zeros(8), step=1, lr=1e-3,
            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, impl=impl),
        "inplace_cross_entropy": lambda impl: inplace_cross_entropy(
            x.clone(), torch.tensor([0, 7, -100]), impl=impl),
        "linear_swiglu": lambda impl: linear_swiglu(x, w, impl=impl),
        "linear_residual": lambda impl: linear_residual(x, w, torch.zeros(3, 10), impl=impl),
        "flash_attention": lambda impl: flash_attention(q, q, q, impl=impl),
    }


@pytest.mark.parametrize("op", list(_ops()))
def test_every_impl_name_runs_on_cpu_without_warning(op):
    run = _ops()[op]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = {impl: run(impl) for impl in ("auto", "torch", "reference")}
    if results["auto"] is not None:  # (adamw_step_ works in place)
        for impl in ("torch", "reference"):
            torch.testing.assert_close(results[impl], results["auto"], equal_nan=True)


@pytest.mark.parametrize("op", list(_ops()))
def test_explicit_triton_that_cannot_run_raises(monkeypatch, op):
    from haillm.flashattn import functional

    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(functional, "_interpreting", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raises, does not warn and degrade
        with pytest.raises(ValueError, match=r"impl='triton'.*impl='torch'.*impl='reference'"):
            _ops()[op]("triton")


@pytest.mark.parametrize("op", list(_ops()))
def test_unknown_impl_lists_the_vocabulary(op):
    with pytest.raises(ValueError, match=r"impl must be one of .*'reference'.*'torch'.*'triton'"):
        _ops()[op]("fast")
