"""Warm up lazy imports in the pytest process *before* ranks are forked.

`run_distributed(..., start_method="fork")` children inherit the parent's memory. The first
`torch.testing.assert_close` lazily imports torch.distributed.tensor (and sympy): ~8 s on a
loaded 2-core machine, paid again in *every* forked rank unless the parent has done it once.
"""

import torch
import torch.distributed.tensor  # noqa: F401 - imported by assert_close on first use
import torch.nn.functional as F

from tests.helpers import assert_close

_x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
F.linear(_x, torch.randn(4, 2, dtype=torch.float64)).sum().backward()
assert_close(_x.grad, _x.grad.clone())
