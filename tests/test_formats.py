"""Packed formats: bit-exact round trips, byte ratios, and bad input."""
import pytest
import torch

from efx_kernels.formats import pack

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def masked_weight(m, n, sparsity, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen).to(dtype)
    keep = torch.rand(m, n, generator=gen) >= sparsity
    return w * keep, keep


def two_four(m, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen).to(dtype)
    order = torch.rand(m, n // 4, 4, generator=gen).argsort(-1)[..., :2]
    keep = torch.zeros(m, n // 4, 4, dtype=torch.bool).scatter_(-1, order, True).reshape(m, n)
    return w * keep, keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (17, 36), (33, 200), (16, 64)])
def test_two_four_round_trip(dtype, shape):
    w, keep = two_four(*shape, dtype)
    keep[0] = False  # an empty row: fewer than two kept per group is allowed
    w = w * keep
    packed = pack(w, keep, "2:4")
    assert torch.equal(packed.unpack(), w)
    assert packed.unpack().dtype == dtype
    assert (packed.keep_mask() | ~keep).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 70), (40, 129), (16, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_bitmap_round_trip(dtype, shape, sparsity):
    w, keep = masked_weight(*shape, sparsity, dtype)
    packed = pack(w, keep, "bitmap")
    assert torch.equal(packed.unpack(), w)
    assert torch.equal(packed.keep_mask(), keep)


def test_negative_zero_and_signs_survive():
    w = torch.tensor([[-0.0, 1.5, -2.25, 0.0, 3.0, -1e-30, 7.0, -7.0]])
    keep = torch.tensor([[True, True, True, False, True, True, False, False]])
    for fmt in ("bitmap", "masked"):
        out = pack(w, keep, fmt).unpack()
        # kept entries bitwise (a kept -0.0 stays -0.0), pruned entries zero
        assert torch.equal(out[keep].view(torch.int32), w[keep].view(torch.int32)), fmt
        assert (out[~keep] == 0).all(), fmt


def test_byte_ratios_match_the_ideal():
    w, keep = two_four(256, 512, torch.bfloat16)
    assert pack(w, keep, "2:4").byte_ratio == pytest.approx(0.5625)
    w, keep = masked_weight(256, 512, 0.5, torch.bfloat16)
    ratio = pack(w, keep, "bitmap").byte_ratio
    assert ratio == pytest.approx(0.5625, abs=0.01)
    w, keep = masked_weight(256, 512, 0.4, torch.bfloat16)
    assert pack(w, keep, "bitmap").byte_ratio == pytest.approx(0.6625, abs=0.01)


def test_bad_input_is_named():
    w, keep = masked_weight(8, 16, 0.3, torch.float32)
    with pytest.raises(ValueError, match="not 2:4 sparse: row"):
        pack(w, keep | True, "2:4")
    with pytest.raises(ValueError, match="does not match"):
        pack(w, keep[:, :8], "bitmap")
    with pytest.raises(ValueError, match="divisible by 4"):
        pack(torch.zeros(4, 6), torch.zeros(4, 6, dtype=torch.bool), "2:4")
    with pytest.raises(ValueError, match="format"):
        pack(w, keep, "csr")
