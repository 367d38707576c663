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
    # bitmap: kept values + 1/16 (mask bits) + 1/32 (an int32 offset per 64 columns) + the padding
    # of each segment to 4 values (1.5 on average: 3/128), docs/formats.md
    for sparsity in (0.5, 0.4):
        w, keep = masked_weight(256, 512, sparsity, torch.bfloat16)
        ideal = (1 - sparsity) + 1 / 16 + 1 / 32 + 3 / 128
        assert pack(w, keep, "bitmap").byte_ratio == pytest.approx(ideal, abs=0.01)


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
    # the bytes v1 stored: eight groups per int32 word, ceil(groups / 8) words (v2 pads to even),
    # and the values unpadded, (m, n/2) (v1-v3)
    words = current.tensors["meta"].view(torch.int32)[:, :v1_words].contiguous()
    values = current.tensors["values"][:, : n // 2].contiguous()
    old = PackedWeight("2:4", current.shape, current.dtype, {"values": values, "meta": words}, 1)
    new = upgrade(old)
    assert new.version == FORMAT_VERSION and torch.equal(new.unpack(), w)
    assert all(torch.equal(new.tensors[k], current.tensors[k]) for k in current.tensors)
    bad = PackedWeight("2:4", current.shape, current.dtype, current.tensors, FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match=f"reads v1 to v{FORMAT_VERSION}"):
        upgrade(bad)


@pytest.mark.parametrize("n", [100, 64, 4])
def test_two_four_values_fill_whole_words_and_version_3_weights_are_upgraded(n):
    from efx_kernels.formats import FORMAT_VERSION, PackedWeight, upgrade
    w, keep = two_four(3, n, torch.bfloat16)
    current = pack(w, keep, "2:4")
    words = current.tensors["meta"].shape[1]
    assert current.tensors["values"].shape == (3, 32 * words)
    assert (current.tensors["values"][:, n // 2:] == 0).all()
    old = PackedWeight("2:4", current.shape, current.dtype,
                       {"values": current.tensors["values"][:, : n // 2].contiguous(),
                        "meta": current.tensors["meta"]}, 3)
    new = upgrade(old)
    assert new.version == FORMAT_VERSION
    assert all(torch.equal(new.tensors[k], current.tensors[k]) for k in current.tensors)


def test_bitmap_layout_one_word_and_one_aligned_offset_per_row_and_64_columns():
    m, n = 3, 130  # three segments per row, the last one of 2 columns
    w, keep = masked_weight(m, n, 0.5, torch.float16, seed=3)
    keep[1, :64] = True  # a full segment
    w = torch.randn(m, n).half() * keep
    packed = pack(w, keep, "bitmap")
    words, offsets, values = (packed.tensors[k] for k in ("bitmap", "offsets", "values"))
    assert words.dtype == torch.int64 and tuple(words.shape) == (m, 3) and tuple(offsets.shape) == (m, 3)
    counts = keep.reshape(-1).new_zeros(m, 3 * 64)
    counts[:, :n] = keep
    counts = counts.reshape(m, 3, 64).sum(-1)
    slots = (counts + 3) // 4
    assert torch.equal(offsets.reshape(-1).long(), slots.reshape(-1).cumsum(0) - slots.reshape(-1))
    assert values.numel() == 4 * int(slots.sum()) + 64  # a 64-value window read from any offset stays inside
    for i in range(m):
        for s in range(3):
            cols = s * 64 + torch.nonzero(keep[i, s * 64:(s + 1) * 64]).flatten()
            bits = sum(1 << int(c - s * 64) for c in cols)
            assert int(words[i, s]) & (2**64 - 1) == bits
            start = 4 * int(offsets[i, s])
            assert torch.equal(values[start:start + len(cols)], w[i, cols])


def v2_bitmap(w, keep):
    """A weight in the bitmap layout of format versions 1-2 (16 x 64 tiles, docs/formats.md history)."""
    from efx_kernels.formats import PackedWeight
    m, n = w.shape
    tr, tc = -(-m // 16), -(-n // 64)
    keep_p = torch.zeros(tr * 16, tc * 64, dtype=torch.bool)
    keep_p[:m, :n] = keep
    w_p = torch.zeros(tr * 16, tc * 64, dtype=w.dtype)
    w_p[:m, :n] = w
    values, offsets, count = [], [0], 0
    for t_row in range(tr):
        for t_col in range(tc):
            tile_keep = keep_p[16 * t_row:16 * t_row + 16, 64 * t_col:64 * t_col + 64]
            values.append(w_p[16 * t_row:16 * t_row + 16, 64 * t_col:64 * t_col + 64][tile_keep])
            count += int(tile_keep.sum())
            offsets.append(count)
    bits = keep_p.reshape(tr * 16, tc * 2, 32).long() << torch.arange(32)
    words = bits.sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).int()
    return PackedWeight("bitmap", (m, n), w.dtype, {"values": torch.cat(values), "bitmap": words,
                                                     "offsets": torch.tensor(offsets, dtype=torch.int32)}, 2)


@pytest.mark.parametrize("shape", [(17, 70), (40, 129), (16, 64)])
def test_version_2_bitmap_weights_are_upgraded(shape):
    from efx_kernels.formats import FORMAT_VERSION, upgrade
    w, keep = masked_weight(*shape, 0.45, torch.bfloat16)
    new = upgrade(v2_bitmap(w, keep))
    assert new.version == FORMAT_VERSION and new.tensors["bitmap"].dtype == torch.int64
    assert torch.equal(new.unpack(), w) and torch.equal(new.keep_mask(), keep)
