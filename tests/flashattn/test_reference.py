"""The reference itself: against a row-by-row oracle, GQA = repeated K/V, masking conventions."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from haillm.flashattn import attention_reference
from tests.flashattn._util import loop_attention, make_qkv
from tests.helpers import assert_close


@given(b=st.integers(1, 2), sq=st.integers(1, 9), sk=st.integers(1, 9), hk=st.integers(1, 2),
       g=st.integers(1, 3), d=st.integers(1, 8), causal=st.booleans(),
       scale=st.one_of(st.none(), st.floats(0.05, 2.0)), seed=st.integers(0, 2**16))
def test_reference_matches_row_by_row_oracle(b, sq, sk, hk, g, d, causal, scale, seed):
    q, k, v, _ = make_qkv(b, sq, sk, hk * g, hk, d, seed=seed)
    out = attention_reference(q, k, v, causal=causal, softmax_scale=scale)
    assert_close(out, loop_attention(q, k, v, causal, scale))


def test_gqa_equals_repeated_kv():
    q, k, v, _ = make_qkv(2, 7, 5, 6, 2, 4, seed=1)
    rep = lambda t: t.repeat_interleave(3, dim=2)
    assert_close(attention_reference(q, k, v), attention_reference(q, rep(k), rep(v)))


def test_causal_is_bottom_right_and_empty_rows_are_zero():
    # seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key -> exactly zero
    q, k, v, do = make_qkv(1, 6, 3, 2, 2, 4, seed=2)
    q.requires_grad_()
    out = attention_reference(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert (out[:, :3] == 0).all() and (out[:, 3:] != 0).all()
    (dq,) = torch.autograd.grad(out, q, do)
    assert torch.isfinite(dq).all() and (dq[:, :3] == 0).all()
    # the last query sees every key, the one before all but the last
    full = attention_reference(q[:, -1:], k, v)
    assert_close(out[:, -1:], full)
    # seqlen_q < seqlen_k: the last query row sees all keys (decoding with a KV cache)
    q2, k2, v2, _ = make_qkv(1, 2, 5, 2, 1, 4, seed=3)
    assert_close(attention_reference(q2, k2, v2, causal=True)[:, -1],
                 attention_reference(q2[:, -1:], k2, v2)[:, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upcast(dtype):
    q, k, v, _ = make_qkv(1, 16, 16, 2, 2, 8, seed=4)
    truth = attention_reference(q, k, v)
    lo = [t.to(dtype) for t in (q, k, v)]
    up = attention_reference(*lo)
    down = attention_reference(*lo, upcast=False)
    assert up.dtype == down.dtype == dtype
    # upcasting is never worse than computing in the low precision, up to the rounding of the
    # output itself (one ulp of the largest |truth|)
    ulp = torch.finfo(dtype).eps * truth.abs().max()
    assert (up.double() - truth).abs().max() <= (down.double() - truth).abs().max() + ulp
