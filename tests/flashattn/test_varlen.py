"""flash_attention_varlen equals running each packed sequence on its own (PyTorch paths)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from haillm.flashattn import flash_attention, flash_attention_varlen
from tests.flashattn._util import fwd_bwd
from tests.helpers import assert_close


@given(lens=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=4),
       h=st.sampled_from([(2, 1), (2, 2), (3, 1)]), causal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_varlen_equals_per_sequence(lens, h, causal, seed):
    nh, nhk = h
    d = 8
    g = torch.Generator().manual_seed(seed)
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lq), nh, d, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lk), nhk, d, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lk), nhk, d, generator=g, dtype=torch.float64)
    do = torch.randn(sum(lq), nh, d, generator=g, dtype=torch.float64)
    got = fwd_bwd(lambda q, k, v: flash_attention_varlen(q, k, v, cu(lq), cu(lk), max(lq),
                                                         max(lk), causal=causal, impl="tiled"),
                  q, k, v, do)
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    for i in range(len(lens)):
        sl_q, sl_k = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        one = fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=causal, impl="reference"),
                      q[None, sl_q], k[None, sl_k], v[None, sl_k], do[None, sl_q])
        assert_close(got[0][sl_q], one[0][0])
        assert_close(got[1][sl_q], one[1][0])
        assert_close(got[2][sl_k], one[2][0])
        assert_close(got[3][sl_k], one[3][0])
