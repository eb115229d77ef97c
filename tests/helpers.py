"""Helpers shared by the test suite: one tolerance table, the low-precision rule, ranks.

Tolerances (used by every package's tests; change them here, nowhere else):

| dtype    | atol  | rtol  | used for                                                     |
|----------|-------|-------|--------------------------------------------------------------|
| float64  | 1e-9  | 1e-7  | optimized path vs reference, both in float64                 |
| float32  | 1e-5  | 1e-5  | both in float32 (reductions reordered)                       |
| float16  | 2e-3  | 2e-3  | direct comparison of half-precision outputs (rarely: prefer the rule) |
| bfloat16 | 2e-2  | 2e-2  | likewise                                                     |

For float16/bfloat16 the spec is the *low-precision rule*: the error of the kernel against
the fp32 truth must be at most 2 x the error of the same-precision PyTorch path against the
same truth (`assert_lowp_close`), plus one unit in the last place of the largest |truth| in
that dtype: rounding the output itself costs up to that, and on tiny problems (a few terms) the
PyTorch path's error can be far below it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from haillm.parallel.testing import RankFailure, free_port, run_distributed

__all__ = [
    "TOL",
    "RankFailure",
    "assert_close",
    "assert_lowp_close",
    "assert_within_roundings",
    "free_port",
    "run_distributed",
    "tol",
]

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    """`atol`/`rtol` for comparing two results computed in `dtype`."""
    return TOL[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, msg: str = "") -> None:
    """`torch.testing.assert_close` with the table's tolerance for `dtype` (default: expected's)."""
    t = tol(dtype or expected.dtype)
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, atol=t["atol"], rtol=t["rtol"],
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def assert_lowp_close(
    kernel: torch.Tensor,
    torch_lowp: torch.Tensor | Sequence[torch.Tensor],
    truth: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-6,
    name: str = "output",
) -> None:
    """The low-precision rule: max|kernel - truth| <= factor * max|torch_lowp - truth| + floor.

    `truth` is the same computation in fp32 (or fp64) from the same (rounded) inputs;
    `torch_lowp` is plain PyTorch run in the kernel's precision; given several PyTorch paths
    (e.g. the textbook formula and the same algorithm as the kernel, written in PyTorch), the
    largest of their errors is the baseline. The floor is at least one ulp (machine epsilon of
    the low-precision dtype) of max|truth|: the rounding of the output.
    """
    paths = [torch_lowp] if isinstance(torch_lowp, torch.Tensor) else list(torch_lowp)
    torch_lowp = paths[0]
    truth = truth.double()
    if torch_lowp.dtype in (torch.float16, torch.bfloat16):
        floor = max(floor, torch.finfo(torch_lowp.dtype).eps * truth.abs().max().item())
    err_k = (kernel.double() - truth).abs().max().item()
    err_t = max((p.double() - truth).abs().max().item() for p in paths)
    assert err_k <= factor * err_t + floor, (
        f"{name}: kernel error {err_k:.3e} > {factor} x PyTorch {torch_lowp.dtype} error "
        f"{err_t:.3e} (+{floor:.3g}), both against fp32"
    )


def assert_within_roundings(actual: torch.Tensor, expected: torch.Tensor,
                            magnitude: torch.Tensor, *, dtype: torch.dtype | None = None,
                            name: str = "output") -> None:
    """Element by element: |actual - expected| <= eps(dtype) * magnitude.

    `magnitude` (fp64, broadcastable) is the derived bound in units of the dtype's machine
    epsilon: the sum, over every rounding an element's value went through, of the magnitude of
    what was rounded (Sigma |terms| of a sum, times how many roundings may differ). A cancelling
    sum that is exactly 0 thus still gets the floor its terms allow; an element whose terms are
    all 0 must match exactly. `dtype` defaults to `expected`'s.
    """
    eps = torch.finfo(dtype or expected.dtype).eps
    err = (actual.double() - expected.double()).abs()
    allowed = eps * magnitude.double().expand_as(err)
    bad = err > allowed
    if bad.any():
        i = int((err - allowed).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements exceed their rounding bound; "
            f"worst at flat index {i}: |{actual.reshape(-1)[i].item():.9g} - "
            f"{expected.reshape(-1)[i].item():.9g}| = {err.reshape(-1)[i].item():.3e} > "
            f"eps * magnitude = {allowed.reshape(-1)[i].item():.3e}"
        )
