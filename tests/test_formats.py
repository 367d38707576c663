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


def test_two_four_positions_are_one_int64_word_per_64_columns():
    # row 0 keeps lanes (1, 3) of group 0 and (0, 2) of group 15; the rest keep lanes (0, 1)
    n = 68  # 17 groups: the 17th starts a second word
    keep = torch.zeros(2, n, dtype=torch.bool)
    keep.view(2, -1, 4)[:, :, :2] = True
    keep[0, :4] = torch.tensor([False, True, False, True])
    keep[0, 60:64] = torch.tensor([True, False, True, False])
    packed = pack(torch.randn(2, n) * keep, keep, "2:4")
    meta = packed.tensors["meta"]
    assert meta.dtype == torch.int64 and tuple(meta.shape) == (2, 2)
    nibble = lambda p0, p1: p0 | (p1 << 2)  # noqa: E731
    want = sum(nibble(0, 1) << (4 * g) for g in range(1, 15)) + nibble(1, 3) + (nibble(0, 2) << 60)
    assert int(meta[0, 0]) & (2**64 - 1) == want
    assert int(meta[0, 1]) == nibble(0, 1)
    assert torch.equal(packed.keep_mask(), keep)


@pytest.mark.parametrize("n, v1_words", [(100, 4), (32, 1)])
def test_version_1_two_four_weights_are_upgraded(n, v1_words):
    from efx_kernels.formats import FORMAT_VERSION, PackedWeight, upgrade
    w, keep = two_four(5, n, torch.float16)
    current = pack(w, keep, "2:4")
    # the bytes v1 stored: eight groups per int32 word, ceil(groups / 8) words (v2 pads to even)
    words = current.tensors["meta"].view(torch.int32)[:, :v1_words].contiguous()
    old = PackedWeight("2:4", current.shape, current.dtype, {"values": current.tensors["values"], "meta": words}, 1)
    new = upgrade(old)
    assert new.version == FORMAT_VERSION and torch.equal(new.unpack(), w)
    bad = PackedWeight("2:4", current.shape, current.dtype, current.tensors, FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="reads v1 and v2"):
        upgrade(bad)
