"""Compressed formats for a pruned base weight (layouts: docs/formats.md, version 4).

- "2:4": per row and 64 columns 32 kept values and an int64 of 2-bit positions (sixteen groups).
- "bitmap": per row and 64 columns an int64 bitmask, that segment's kept values packed from an
  8-byte-aligned offset; any sparsity.
- "masked": the dense weight with zeros (no compression; the reference layout).

`pack(weight, keep_mask, format)` -> PackedWeight; `PackedWeight.unpack()` returns the dense
weight bit-exactly (zeros where pruned).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FORMAT_VERSION = 4
FORMATS = ("2:4", "bitmap", "masked")
GROUPS_PER_WORD = 16  # 2:4 metadata: sixteen 4-column groups (4 bits each) per int64, one word per 64 columns


@dataclass
class PackedWeight:
    """A compressed (m, n) weight. `tensors` holds the format's arrays (see docs/formats.md)."""

    format: str
    shape: tuple[int, int]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    version: int = FORMAT_VERSION
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed representation."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    @property
    def byte_ratio(self) -> float:
        """Compressed bytes / dense bytes."""
        return self.nbytes / self.dense_nbytes

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.format, self.shape, self.dtype, {k: v.to(device) for k, v in self.tensors.items()},
                            self.version)

    def unpack(self) -> torch.Tensor:
        """The dense (m, n) weight, zeros where pruned."""
        return UNPACK[self.format](self)

    def keep_mask(self) -> torch.Tensor:
        """The stored positions (bool (m, n)); for 2:4 these are always two per group."""
        if self.format == "2:4":
            return _positions_24(self.tensors["meta"], *self.shape)
        if self.format == "bitmap":
            return _bits(self.tensors["bitmap"], *self.shape)
        return self.tensors["weight"] != 0


def _check(weight: torch.Tensor, keep_mask: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if keep_mask.shape != weight.shape:
        raise ValueError(f"keep_mask shape {tuple(keep_mask.shape)} does not match weight {tuple(weight.shape)}")
    if keep_mask.dtype != torch.bool:
        raise ValueError(f"keep_mask must be bool, got {keep_mask.dtype}")


def pack(weight: torch.Tensor, keep_mask: torch.Tensor | None = None, format: str = "bitmap") -> PackedWeight:
    """Compress `weight` keeping the positions in `keep_mask` (default: its nonzeros).

    Values outside the mask are dropped (stored as zeros). Raises ValueError for a shape
    mismatch or, for 2:4, a mask with more than two kept values in a group of four.
    """
    if keep_mask is None:
        keep_mask = weight != 0
    _check(weight, keep_mask)
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: expected one of {FORMATS}")
    weight = weight.detach()
    return PACK[format](weight, keep_mask)


# ---- masked ---------------------------------------------------------------------------

def _pack_masked(weight, keep):
    return PackedWeight("masked", tuple(weight.shape), weight.dtype, {"weight": weight * keep})


def _unpack_masked(p):
    return p.tensors["weight"].clone()


# ---- 2:4 ------------------------------------------------------------------------------

def _overfull_groups(keep: torch.Tensor) -> torch.Tensor:
    """(m, n/4) bool: the groups of four columns that keep more than two."""
    return keep.reshape(keep.shape[0], -1, 4).sum(-1) > 2


def fits_2_4(keep: torch.Tensor) -> bool:
    """Whether a (m, n) keep mask can be packed as 2:4: n divisible by 4, at most two kept in each
    group of four columns."""
    return keep.shape[1] % 4 == 0 and not bool(_overfull_groups(keep).any())


def _pack_24(weight, keep):
    m, n = weight.shape
    if n % 4:
        raise ValueError(f"2:4 needs in_features divisible by 4, got {n}")
    groups = keep.reshape(m, n // 4, 4)
    overfull = _overfull_groups(keep)
    if overfull.any():
        row, group = overfull.nonzero()[0].tolist()
        raise ValueError(f"the weight is not 2:4 sparse: row {row}, columns {4 * group}..{4 * group + 3} keep "
                         f"{int(groups[row, group].sum())} of 4")
    # positions of the kept entries first (in column order), then fillers from the pruned ones
    lane = torch.arange(4, device=weight.device).expand(m, n // 4, 4)
    order = torch.sort(torch.where(groups, lane, lane + 4), dim=-1).values[..., :2] % 4  # (m, g, 2)
    order = torch.sort(order, dim=-1).values
    words = -(-(n // 4) // GROUPS_PER_WORD)
    # values padded with zeros to whole 64-column words: a kernel reads a row's step without masks
    vals = torch.zeros(m, 2 * GROUPS_PER_WORD * words, dtype=weight.dtype, device=weight.device)
    vals[:, : n // 2] = (weight * keep).reshape(m, n // 4, 4).gather(-1, order).reshape(m, n // 2)
    nibble = (order[..., 0] | (order[..., 1] << 2)).to(torch.int64)  # (m, g)
    padded = torch.zeros(m, words * GROUPS_PER_WORD, dtype=torch.int64, device=weight.device)
    padded[:, : n // 4] = nibble
    shifts = (torch.arange(GROUPS_PER_WORD, device=weight.device) * 4).to(torch.int64)
    # the nibbles occupy disjoint bits, so the sum is their bitwise or (it wraps into the sign bit
    # for the sixteenth group, which int64 addition does exactly)
    meta = (padded.reshape(m, words, GROUPS_PER_WORD) << shifts).sum(-1)
    return PackedWeight("2:4", (m, n), weight.dtype, {"values": vals.contiguous(), "meta": meta.contiguous()})


def _nibbles(meta, m, n):
    shifts = (torch.arange(GROUPS_PER_WORD, device=meta.device) * 4).to(torch.int64)
    return ((meta[..., None] >> shifts) & 0xF).reshape(m, -1)[:, : n // 4]


def _positions_24(meta, m, n):
    nib = _nibbles(meta, m, n)
    keep = torch.zeros(m, n // 4, 4, dtype=torch.bool, device=meta.device)
    keep.scatter_(-1, (nib & 3)[..., None], True)
    keep.scatter_(-1, (nib >> 2)[..., None], True)
    return keep.reshape(m, n)


def _unpack_24(p):
    m, n = p.shape
    nib = _nibbles(p.tensors["meta"], m, n)
    order = torch.stack([nib & 3, nib >> 2], dim=-1)
    dense = torch.zeros(m, n // 4, 4, dtype=p.dtype, device=p.device)
    dense.scatter_(-1, order, p.tensors["values"][:, : n // 2].reshape(m, n // 4, 2))
    return dense.reshape(m, n)


# ---- bitmap ---------------------------------------------------------------------------

SEGMENT = 64  # bitmap: columns per mask word
ALIGN = 4  # bitmap: a segment's values start at a multiple of 4 elements (8 bytes in bf16/fp16)


def _segments(n):
    return -(-n // SEGMENT)


def _mask_words(keep_p):
    """int64 (m, segments): bit b of word s is column 64*s + b (bit 63 wraps into the sign)."""
    m, np_ = keep_p.shape
    shifts = torch.arange(SEGMENT, device=keep_p.device, dtype=torch.int64)
    return (keep_p.reshape(m, np_ // SEGMENT, SEGMENT).to(torch.int64) << shifts).sum(-1)


def _pack_bitmap(weight, keep):
    m, n = weight.shape
    segs = _segments(n)
    keep_p = torch.zeros(m, segs * SEGMENT, dtype=torch.bool, device=weight.device)
    keep_p[:, :n] = keep
    vals_p = torch.zeros(m, segs * SEGMENT, dtype=weight.dtype, device=weight.device)
    vals_p[:, :n] = weight
    keep_s = keep_p.reshape(m, segs, SEGMENT)
    slots = -(-keep_s.sum(-1) // ALIGN)  # each segment's values in units of ALIGN elements
    starts = slots.reshape(-1).cumsum(0) - slots.reshape(-1)
    total = int(slots.sum()) * ALIGN
    if total // ALIGN >= 2**31:
        raise ValueError("the bitmap format holds at most 2^33 values per weight (int32 offsets of 4 values)")
    values = torch.zeros(total + SEGMENT, dtype=weight.dtype, device=weight.device)  # + a window's read past the end
    place = starts.reshape(m, segs, 1) * ALIGN + keep_s.cumsum(-1) - 1
    values[place[keep_s]] = vals_p.reshape(m, segs, SEGMENT)[keep_s]
    return PackedWeight("bitmap", (m, n), weight.dtype, {"values": values, "bitmap": _mask_words(keep_p),
                                                          "offsets": starts.reshape(m, segs).to(torch.int32)})


def _bits(bitmap, m, n):
    shifts = torch.arange(SEGMENT, device=bitmap.device, dtype=torch.int64)
    bits = (bitmap.to(torch.int64)[..., None] >> shifts) & 1
    return bits.reshape(bitmap.shape[0], -1)[:m, :n].bool()


def _unpack_bitmap(p):
    m, n = p.shape
    segs = _segments(n)
    keep_s = _bits(p.tensors["bitmap"], m, segs * SEGMENT).reshape(m, segs, SEGMENT)
    place = p.tensors["offsets"].to(torch.int64).reshape(m, segs, 1) * ALIGN + keep_s.cumsum(-1) - 1
    dense = torch.zeros(m, segs, SEGMENT, dtype=p.dtype, device=p.device)
    dense[keep_s] = p.tensors["values"][place[keep_s]]
    return dense.reshape(m, segs * SEGMENT)[:, :n].contiguous()


def _unpack_bitmap_v2(p):
    """The dense weight of a version 1-2 bitmap: 16 x 64 tiles, int32 mask words, values packed
    tile by tile in row-major order, one offset per tile."""
    m, n = p.shape
    tr, tc = -(-m // 16), -(-n // 64)
    words = p.tensors["bitmap"].to(torch.int64) & 0xFFFFFFFF
    keep_p = ((words[..., None] >> torch.arange(32, device=words.device)) & 1).reshape(words.shape[0], -1).bool()
    tiled_keep = keep_p.reshape(tr, 16, tc, 64).permute(0, 2, 1, 3).reshape(tr * tc, -1)
    tiled = torch.zeros(tiled_keep.shape, dtype=p.dtype, device=p.device)
    tiled[tiled_keep] = p.tensors["values"]
    dense = tiled.reshape(tr, tc, 16, 64).permute(0, 2, 1, 3).reshape(tr * 16, tc * 64)
    return dense[:m, :n].contiguous(), keep_p[:m, :n]


def upgrade(packed: PackedWeight) -> PackedWeight:
    """The same weight in the current layout (version 4).

    2:4: version 1 stored the positions in int32 words of eight groups; versions 2-4 keep those
    bytes, padded to whole 64-column words, read as int64 (little-endian: the first int32 word is
    the low half); versions 1-3 stored the values (m, n/2), version 4 pads each row with zeros to
    32 values per position word. Bitmap: versions 1-2 packed 16 x 64 tiles (see `_unpack_bitmap_v2`);
    versions 3-4 pack each row's 64-column segments (docs/formats.md), so a v1-2 bitmap is unpacked
    and packed again. Masked has not changed.
    """
    if packed.version == FORMAT_VERSION:
        return packed
    if packed.version not in (1, 2, 3):
        raise ValueError(f"packed format v{packed.version}: this efx reads v1 to v{FORMAT_VERSION}")
    tensors = dict(packed.tensors)
    if packed.format == "bitmap" and packed.version < 3:
        return pack(*_unpack_bitmap_v2(packed), format="bitmap")
    if packed.format == "2:4":
        if packed.version == 1:
            meta = tensors["meta"].to(torch.int32)
            if meta.shape[1] % 2:
                meta = torch.cat([meta, torch.zeros_like(meta[:, :1])], dim=1)
            tensors["meta"] = meta.contiguous().view(torch.int64)
        values = tensors["values"]
        missing = 2 * GROUPS_PER_WORD * tensors["meta"].shape[1] - values.shape[1]
        if missing:  # none where n is a multiple of 64: the values are kept as they are
            tensors["values"] = torch.cat([values, values.new_zeros(values.shape[0], missing)], dim=1)
    return PackedWeight(packed.format, packed.shape, packed.dtype, tensors)


PACK = {"2:4": _pack_24, "bitmap": _pack_bitmap, "masked": _pack_masked}
UNPACK = {"2:4": _unpack_24, "bitmap": _unpack_bitmap, "masked": _unpack_masked}
