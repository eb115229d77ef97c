"""The Triton kernels (interpreter on CPU: fp32 and fp16, tiny shapes; bf16 on GPU only).

fp32 kernels are compared with the float64 reference at the fp32 tolerance; fp16 kernels follow
the low-precision rule against the fp64 truth of the same (rounded) inputs.
"""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from haillm.flashattn import attention_reference, flash_attention, flash_attention_varlen
from tests.flashattn._util import assert_attention_rule, fwd_bwd, make_qkv
from tests.helpers import assert_close, assert_lowp_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _check(b, sq, sk, h, hk, d, causal, scale, dtype, seed, device=DEV):
    q, k, v, do = make_qkv(b, sq, sk, h, hk, d, dtype=dtype, seed=seed, device=device)
    got = fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=causal, softmax_scale=scale,
                                                  impl="triton"), q, k, v, do)
    for name, a in zip(("out", "dq", "dk", "dv"), got):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
    # The low-precision rule against ONE named baseline, the textbook formula in the kernel's
    # precision (fp32 included: the kernel reorders every reduction); see
    # `assert_attention_rule` (dK at seqlen_k = 1 is a cancelling sum that is exactly 0).
    assert_attention_rule(got, q, k, v, do, causal, scale)


@given(b=st.integers(1, 2), sq=st.integers(1, 40), sk=st.integers(1, 40), hk=st.integers(1, 2),
       g=st.integers(1, 2), d=st.sampled_from([8, 16, 24, 32]), causal=st.booleans(),
       scale=st.one_of(st.none(), st.floats(0.1, 1.5)),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
@example(b=1, sq=36, sk=1, hk=1, g=2, d=24, causal=False, scale=None, dtype=torch.float32,
         seed=0)  # dK = 0 exactly: a cancelling sum (issue 14)
@example(b=1, sq=30, sk=37, hk=2, g=1, d=32, causal=True, scale=0.835902653003293,
         dtype=torch.float16, seed=207)  # dK elements in fp16's subnormal range (explore seed 0)
@example(b=1, sq=11, sk=1, hk=1, g=1, d=32, causal=False, scale=1.0, dtype=torch.float32,
         seed=0)  # dV = an 11-term fp32 sum, reordered (explore seed 1)
@example(b=1, sq=7, sk=6, hk=1, g=1, d=8, causal=False, scale=1.0, dtype=torch.float32,
         seed=1)  # explore seed 5
@example(b=1, sq=7, sk=1, hk=1, g=1, d=24, causal=True, scale=1.0, dtype=torch.float32,
         seed=0)  # explore seed 6
def test_triton_equals_reference(b, sq, sk, hk, g, d, causal, scale, dtype, seed):
    _check(b, sq, sk, hk * g, hk, d, causal, scale, dtype, seed)


@pytest.mark.parametrize("sq,sk,causal", [(1, 1, True), (17, 33, True), (33, 17, True),
                                          (16, 48, False), (47, 47, True)])
def test_triton_edge_shapes_fp32(sq, sk, causal):
    # 1, exact block multiples, tails, causal with seqlen_q > seqlen_k (empty rows)
    _check(1, sq, sk, 2, 1, 16, causal, None, torch.float32, seed=sq * 100 + sk)


def test_triton_varlen_equals_per_sequence():
    lens_q, lens_k = [5, 1, 19, 17], [7, 3, 19, 9]
    h, hk, d = 2, 1, 16
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32,
                                 device=DEV)
    q, _, _, do = make_qkv(1, sum(lens_q), 1, h, hk, d, dtype=torch.float32, seed=8, device=DEV)
    _, k, v, _ = make_qkv(1, 1, sum(lens_k), h, hk, d, dtype=torch.float32, seed=9, device=DEV)
    q, do, k, v = q[0], do[0], k[0], v[0]
    for causal in (False, True):
        got = fwd_bwd(lambda q, k, v: flash_attention_varlen(
            q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=causal,
            impl="triton"), q, k, v, do)
        want = fwd_bwd(lambda q, k, v: flash_attention_varlen(
            q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=causal,
            impl="reference"), q, k, v, do)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
            assert_close(a, e, msg=f"{name} causal={causal}")


def test_triton_noncontiguous_inputs():
    q, k, v, do = make_qkv(2, 20, 20, 2, 2, 16, dtype=torch.float32, seed=10, device=DEV)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, H, D) view with odd strides
    got = fwd_bwd(lambda q, k, v: flash_attention(q, k, v, impl="triton"), qt, k, v, do)
    assert_attention_rule(got, q, k, v, do, False, None)


@pytest.mark.parametrize("d", [59, 111, 160, 192, 224, 256])
def test_triton_head_dims_of_flash_attn_tests(d):
    """flash-attention's tests/test_flash_attn.py head dims, up to 256 (FlashAttention-2's
    limit), incl. ones that are not a power of two (masked to BLOCK_D), with its odd seqlens."""
    _check(1, 17, 33, 2, 1, d, True, None, torch.float32, seed=d)
    if d == 256:
        _check(1, 41, 23, 2, 2, d, False, None, torch.float16, seed=d + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 64, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_gpu_bf16(d, causal):
    _check(2, 300, 300, 4, 2, d, causal, None, torch.bfloat16, seed=d, device="cuda")
    _check(1, 129, 511, 4, 1, d, causal, None, torch.bfloat16, seed=d + 1, device="cuda")
    _check(1, 511, 129, 2, 2, d, causal, 0.3, torch.bfloat16, seed=d + 2, device="cuda")


@pytest.mark.gpu
def test_triton_gpu_fp16():
    _check(2, 300, 257, 4, 2, 64, True, None, torch.float16, seed=3, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [16, 80, 128, 256])
def test_triton_gpu_fp32(d):
    _check(2, 200, 333, 4, 2, d, True, None, torch.float32, seed=d, device="cuda")


@pytest.mark.gpu
def test_triton_gpu_auto_and_varlen_bf16():
    lens = [100, 1, 257, 64]
    h, hk, d = 4, 2, 64
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    q, _, _, do = make_qkv(1, sum(lens), 1, h, hk, d, dtype=torch.bfloat16, seed=11, device="cuda")
    _, k, v, _ = make_qkv(1, 1, sum(lens), h, hk, d, dtype=torch.bfloat16, seed=12, device="cuda")
    q, do, k, v = q[0], do[0], k[0], v[0]
    got = fwd_bwd(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens),
                                                         causal=True), q, k, v, do)
    truth = fwd_bwd(lambda q, k, v: flash_attention_varlen(q.double(), k.double(), v.double(), cu,
                                                           cu, max(lens), max(lens), causal=True,
                                                           impl="reference"), q, k, v, do.double())
    # the same-precision PyTorch path, one sequence at a time
    per_seq = [fwd_bwd(lambda q, k, v: attention_reference(q, k, v, causal=True, upcast=False),
                       q[None, a:b], k[None, a:b], v[None, a:b], do[None, a:b])
               for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    plain = [torch.cat([p[i][0] for p in per_seq]) for i in range(4)]
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_lowp_close(got[i], plain[i], truth[i], name=name)  # floor: eps(bf16) max|truth|


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only path")
def test_triton_interpreter_bf16_is_computed_in_fp32():
    # the interpreter cannot do bf16 arithmetic: the launcher upcasts and rounds the result once
    q, k, v, do = make_qkv(1, 20, 20, 2, 1, 16, dtype=torch.bfloat16, seed=13)
    got = fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="triton"), q, k, v, do)
    want = fwd_bwd(lambda q, k, v: attention_reference(q.float(), k.float(), v.float(),
                                                       causal=True).to(q.dtype), q, k, v, do)
    for a, e in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert_close(a, e, dtype=torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter block sizes")
@pytest.mark.parametrize("blocks", [
    {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)},
    {"fwd": (16, 32), "dkdv": (32, 16), "dq": (16, 64)},
    {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 64)},  # the bf16 head-dim-128 shapes
])
def test_triton_unequal_block_sizes(monkeypatch, blocks):
    """The GPU configs use BLOCK_M != BLOCK_N: the causal split points must not assume equality."""
    from haillm.flashattn import ops

    monkeypatch.setattr(ops, "INTERPRET_BLOCKS", blocks)
    for sq, sk in ((45, 45), (23, 50), (50, 23)):
        _check(1, sq, sk, 2, 1, 16, True, None, torch.float32, seed=sq + sk)
    _check(2, 37, 29, 2, 2, 16, False, None, torch.float32, seed=5)
