"""Bad input fails early with a message naming the argument and what was expected."""

import warnings

import pytest
import torch

from haillm.flashattn import attention_reference, flash_attention, flash_attention_varlen
from haillm.flashattn.functional import resolve_impl


def qkv(b=1, sq=4, sk=4, h=2, hk=2, d=8, dtype=torch.float32):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


@pytest.mark.parametrize("fn", [flash_attention, attention_reference])
def test_shape_errors(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dims \(batch, seqlen_q, nheads, headdim\)"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="k must have 4 dims"):
        fn(q, k[0], v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fn(q, k, v[:, :3])
    with pytest.raises(ValueError, match=r"batch of q \(2\) and k/v \(1\) must match"):
        fn(torch.cat([q, q]), k, v)
    with pytest.raises(ValueError, match=r"headdim of k/v \(4\) must equal headdim of q \(8\)"):
        fn(q, k[..., :4], v[..., :4])
    q3, k3, v3 = qkv(h=3, hk=2)
    with pytest.raises(ValueError, match=r"nheads \(3\) must be divisible by nheads_kv \(2\)"):
        fn(q3, k3, v3)
    with pytest.raises(TypeError, match="same dtype"):
        fn(q.double(), k, v)
    with pytest.raises(TypeError, match="floating point"):
        fn(q.int(), k.int(), v.int())


def test_device_mismatch_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same device"):
        flash_attention(q, k.to("meta"), v.to("meta"))


def test_impl_errors_name_the_supporting_impl():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="impl must be one of"):
        flash_attention(q, k, v, impl="cuda")
    with pytest.raises(TypeError, match=r"impl='triton' supports dtypes .*tiled"):
        flash_attention(q.double(), k.double(), v.double(), impl="triton")
    qd, kd, vd = qkv(d=300)
    with pytest.raises(ValueError, match=r"impl='triton' supports headdim <= \d+, got 300.*tiled"):
        flash_attention(qd, kd, vd, impl="triton")


def test_auto_picks_tiled_on_cpu_without_warning():
    q, _, _ = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("auto", q) == "tiled"


def test_auto_falls_back_with_warning(monkeypatch):
    """On CUDA an unsupported input falls back to tiled, loudly (simulated with a fake device)."""
    q, _, _ = qkv(dtype=torch.float64)

    class FakeCuda:
        type = "cuda"

    class FakeQ:
        device, dtype, shape = FakeCuda(), q.dtype, q.shape

    with pytest.warns(UserWarning, match="impl='auto' falls back to impl='torch'"):
        assert resolve_impl("auto", FakeQ()) == "tiled"


def test_varlen_errors():
    q, k, v = (t[0] for t in qkv(sq=6, sk=6))
    good = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q must have 3 dims \(total_q, nheads, headdim\)"):
        flash_attention_varlen(q[None], k, v, good, good, 4, 4)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        flash_attention_varlen(q, k, v, good.long(), good, 4, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[0\] must be 0"):
        flash_attention_varlen(q, k, v, good, good + 1, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        flash_attention_varlen(q, k, v, torch.tensor([0, 4, 2, 6], dtype=torch.int32), good, 4, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] \(5\) must equal .* \(6\)"):
        flash_attention_varlen(q, k, v, torch.tensor([0, 5], dtype=torch.int32), good, 6, 4)
    with pytest.raises(ValueError, match=r"max_seqlen for cu_seqlens_k \(3\) is smaller"):
        flash_attention_varlen(q, k, v, good, good, 4, 3)
    with pytest.raises(ValueError, match="same length"):
        flash_attention_varlen(q, k, v, good, torch.tensor([0, 6], dtype=torch.int32), 4, 6)
    with pytest.raises(ValueError, match=r"shape \(batch \+ 1,\)"):
        flash_attention_varlen(q, k, v, good[None], good, 4, 4)


def test_triton_on_cpu_without_interpreter_names_tiled(monkeypatch):
    from haillm.flashattn import functional

    monkeypatch.setattr(functional, "_interpreting", lambda: False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"impl='triton' needs CUDA tensors .*impl='torch'"):
        flash_attention(q, k, v, impl="triton")


def test_torch_names_the_tiled_path():
    """The shared vocabulary: impl="torch" is the optimized PyTorch path, "tiled" its alias."""
    q, k, v = qkv()
    assert resolve_impl("torch", q) == resolve_impl("tiled", q) == "tiled"
    assert torch.equal(flash_attention(q, k, v, causal=True, impl="torch"),
                       flash_attention(q, k, v, causal=True, impl="tiled"))
