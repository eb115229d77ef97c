"""The tiled (pure-PyTorch FlashAttention) path: equal to the reference in float64, forward and
all three gradients; low precision follows the rule; the memory property holds."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from haillm.flashattn import attention_reference, flash_attention
from haillm.flashattn.tiled import tiled_attention
from tests.flashattn._util import ROUNDINGS, attention_magnitudes, fwd_bwd, make_qkv
from tests.helpers import assert_close, assert_lowp_close


@given(b=st.integers(1, 2), sq=st.integers(1, 40), sk=st.integers(1, 40), hk=st.integers(1, 2),
       g=st.integers(1, 3), d=st.sampled_from([1, 5, 16, 24]), causal=st.booleans(),
       scale=st.one_of(st.none(), st.floats(0.05, 2.0)), bq=st.sampled_from([1, 3, 8, 16, 128]),
       bk=st.sampled_from([1, 4, 7, 16, 128]), seed=st.integers(0, 2**16))
def test_tiled_equals_reference_fp64(b, sq, sk, hk, g, d, causal, scale, bq, bk, seed):
    q, k, v, do = make_qkv(b, sq, sk, hk * g, hk, d, seed=seed)
    s = scale if scale is not None else d ** -0.5
    ref = fwd_bwd(lambda q, k, v: attention_reference(q, k, v, causal=causal, softmax_scale=scale),
                  q, k, v, do)
    got = fwd_bwd(lambda q, k, v: tiled_attention(q, k, v, causal=causal, softmax_scale=s,
                                                  block_q=bq, block_k=bk), q, k, v, do)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, msg=name)


def test_public_api_tiled_and_auto_on_cpu():
    q, k, v, do = make_qkv(2, 33, 20, 4, 2, 16, seed=5)
    ref = fwd_bwd(lambda q, k, v: attention_reference(q, k, v, causal=True), q, k, v, do)
    for impl in ("tiled", "auto"):
        got = fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=True, impl=impl), q, k, v, do)
        for a, e in zip(got, ref):
            assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tiled_low_precision_rule(dtype):
    q, k, v, do = make_qkv(2, 45, 45, 4, 2, 32, seed=6)
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    truth = fwd_bwd(lambda q, k, v: attention_reference(q.double(), k.double(), v.double(),
                                                        causal=True), q, k, v, do.double())
    plain = fwd_bwd(lambda q, k, v: attention_reference(q, k, v, causal=True, upcast=False),
                    q, k, v, do)
    got = fwd_bwd(lambda q, k, v: tiled_attention(q, k, v, causal=True, softmax_scale=32 ** -0.5,
                                                  block_q=16, block_k=16), q, k, v, do)
    mags = attention_magnitudes(q, k, v, do, True, 32 ** -0.5)
    for name, a, p, t, m in zip(("out", "dq", "dk", "dv"), got, plain, truth, mags):
        assert a.dtype == dtype
        assert_lowp_close(a, p, t, magnitude=m, roundings=ROUNDINGS[name],
                          reduction=45 + 45 + 32, name=name)


def _saved_bytes(fn, *args):
    """Bytes of every tensor autograd saves for backward while running fn(*args)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(total)


@pytest.mark.parametrize("causal", [False, True])
def test_memory_saved_for_backward_is_linear_in_seqlen(causal):
    """The FlashAttention property: no (seqlen x seqlen) tensor is saved for backward."""
    b, h, d = 1, 2, 16
    sizes = {}
    for s in (128, 512):
        q, k, v, _ = make_qkv(b, s, s, h, h, d, dtype=torch.float32, seed=7)
        q.requires_grad_()
        tiled = _saved_bytes(lambda q, k, v: flash_attention(q, k, v, causal=causal, impl="tiled"),
                             q, k, v)
        ref = _saved_bytes(lambda q, k, v: attention_reference(q, k, v, causal=causal), q, k, v)
        # q, k, v, O (4 x S·H·D) plus the logsumexp (S·H), nothing else
        assert tiled <= (4 * s * h * d + s * h) * 4, (s, tiled)
        # and the test can fail: the reference saves the probabilities, S² per head
        assert ref >= s * s * h * 4
        sizes[s] = tiled
    assert sizes[512] <= 4 * sizes[128] * 1.01  # grows linearly (the reference: 16x)
