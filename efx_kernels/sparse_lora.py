"""Sparse base + LoRA matmul: y = x @ W^T + s * (x @ A^T) @ B^T + bias, with W read in a compressed
format (2:4, bitmap, or masked dense; efx_kernels.formats), forward and backward (dX, dA, dB;
the base stays frozen).

Paths: the fused Triton kernels on CUDA; torch's semi-structured 2:4 path for prefill where the
GPU has it; the torch reference (the packed weight unpacked once, then F.linear) elsewhere.

Fused sparse-base + LoRA matmul: y = x @ W^T + (s * x @ A^T) @ B^T + bias, with W read in a
compressed format (2:4, bitmap, or masked dense) and decompressed tile by tile on chip ("load as
sparse, compute as dense"), and the LoRA product added to the accumulator before the single
output write. The backward kernel computes dX the same way; the LoRA gradients are small
GEMMs done by torch.

Tile conventions: a weight tile is BLOCK_ROWS output features x 64 input features (one 2:4
position word or one bitmap mask word per row). Every format's weight loads are pipelined with
the activation load (cp.async into shared memory, num_stages deep). The 2:4 tile is read as one
position word (two int32 halves) and eight int64 value quads per row, without masks (the format
pads each row to whole 64-column words; a quad: the value pairs of two adjacent groups, whose
position nibbles make one byte of the word); a quad's eight lanes are four byte
permutes (PTX prmt, inline assembly) of its two pairs under the four selectors of its position
byte, the 16 bytes of one row of a 256-row table read through L1, whose address is one more prmt
(the table is 64 KB aligned), not one masked load per element.
The bitmap tile is read as one int64 mask word, one offset and one 32-word window of packed
values per row, and decoded a column pair at a time: two in-warp shuffles fetch the window words
that hold the pair's elements, a funnel shift aligns them and one prmt places them by the pair's
two mask bits (inline PTX). The interpreter has no inline assembly and computes the same bits in
tensor arithmetic (EMULATE). Costs per weight, compiled for sm_90: benchmarks/kernel_static.py.

dtypes: the kernels take fp16 and bf16 (16-bit tensor-core dots with fp32 accumulation); fp32
runs the torch path (`_fused_takes`).

On a GPU both kernels are autotuned, keyed on the token-count bucket (powers of two from 16 to
1024), the layer shape, the LoRA rank and the format; the interpreter (CPU tests) skips the
search and uses 16 x 16 tiles, or the tiles a test passes.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from efx_kernels._triton import block_for_rank, tl, triton
from efx_kernels.dispatch import interpreting, mode, use_triton
from efx_kernels.formats import ALIGN, SEGMENT, PackedWeight

assert ALIGN == 4 and SEGMENT == 64, "the bitmap decode below reads 64-column segments aligned to 4 elements"

log = logging.getLogger(__name__)

PREFILL_TOKENS = 256  # from here on the 2:4 library path is tried on CUDA
FUSED_DTYPES = (torch.float16, torch.bfloat16)


def _fused_takes(x: torch.Tensor, packed: PackedWeight) -> bool:
    """Whether the fused kernels take this call: they run 16-bit tensor-core dots, so fp32 runs the
    torch path (cuBLAS) under EFX_KERNELS=auto and is refused under EFX_KERNELS=triton."""
    if x.dtype in FUSED_DTYPES and packed.dtype in FUSED_DTYPES:
        return True
    if mode() == "triton":
        raise ValueError(f"the fused sparse-LoRA kernels take fp16 or bf16, got x {x.dtype} and a {packed.dtype} "
                         "weight; EFX_KERNELS=auto runs other dtypes on the torch path")
    return False


def _semi_structured(packed: PackedWeight):
    """torch's cuSPARSELt/CUTLASS 2:4 weight, built once per PackedWeight; None where unsupported."""
    if "semi" not in packed.cache:
        try:
            from torch.sparse import to_sparse_semi_structured
            packed.cache["semi"] = to_sparse_semi_structured(packed.unpack())
        except Exception as err:  # unsupported GPU, dtype or shape
            log.debug("semi-structured 2:4 unavailable: %s", err)
            packed.cache["semi"] = None
    return packed.cache["semi"]


def sparse_lora_linear(x: torch.Tensor, packed: PackedWeight, A: torch.Tensor | None, B: torch.Tensor | None,
                       scale: float, bias: torch.Tensor | None = None, lora_input: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """y = x @ W^T + scale * (lora_input @ A^T) @ B^T + bias, W read from `packed`.

    x: (..., in) fp16/bf16 on the Triton path, any float dtype on the reference path;
    A (r, in), B (out, r) trainable; lora_input defaults to x (pass dropout(x) in training).
    Returns (..., out) in x's dtype.
    """
    n_in = packed.shape[1]
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {n_in}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, n_in)
    lora2d = x2d if lora_input is None else lora_input.reshape(-1, n_in)
    if use_triton(x2d, A, B) and _fused_takes(x2d, packed):
        if packed.format == "2:4" and x2d.is_cuda and x2d.shape[0] >= PREFILL_TOKENS and not x2d.requires_grad:
            semi = _semi_structured(packed)
            if semi is not None:
                y = F.linear(x2d, semi, bias)
                if A is not None:
                    y = y + scale * ((lora2d @ A.T.to(x.dtype)) @ B.T.to(x.dtype))
                return y.reshape(*lead, -1)
        x2d = x2d.contiguous()
        lora2d = x2d if lora_input is None else lora2d.contiguous()
        y = _FusedSparseLoRA.apply(x2d, lora2d, A, B, bias, packed, float(scale))
        return y.reshape(*lead, -1)
    # unpacked per call and dropped after it: a dense copy kept beside the packed tensors would make
    # the packed model larger in memory than the dense one
    y = F.linear(x2d, packed.unpack().to(x.dtype), None if bias is None else bias.to(x.dtype))
    if A is not None:
        y = y + scale * ((lora2d @ A.T.to(x.dtype)) @ B.T.to(x.dtype))
    return y.reshape(*lead, -1)


# ---- torch reference ------------------------------------------------------------------

def sparse_lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor | None,
                                 B: torch.Tensor | None, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + scale * (x @ A^T) @ B^T + bias with W the dense (zeros where pruned) base."""
    y = x @ weight.T.to(x.dtype)
    if A is not None and A.numel():
        y = y + scale * ((x @ A.T.to(x.dtype)) @ B.T.to(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


# ---- Triton ---------------------------------------------------------------------------

class _FusedSparseLoRA(torch.autograd.Function):
    """Triton forward and dX; the LoRA gradients are (M x r)-sized GEMMs done by torch."""

    @staticmethod
    def forward(ctx, x2d, lora_in, A, B, bias, packed, scale):
        fused = lora_in is x2d
        xa = None if A is None else scale * (lora_in @ A.T.to(lora_in.dtype))
        y = fused_forward(x2d, packed, xa, None if B is None else B.to(x2d.dtype), bias)
        ctx.packed, ctx.scale, ctx.fused = packed, scale, fused
        ctx.save_for_backward(lora_in, A, B, xa)
        return y

    @staticmethod
    def backward(ctx, dy):
        lora_in, A, B, xa = ctx.saved_tensors
        dy = dy.contiguous()
        dyb = None if B is None else ctx.scale * (dy @ B.to(dy.dtype))
        fused = ctx.fused and dyb is not None
        dx = fused_grad_input(dy, ctx.packed, dyb if fused else None,
                                      A.to(dy.dtype) if fused else None) if ctx.needs_input_grad[0] else None
        d_lora_in = None
        if dyb is not None and not fused and ctx.needs_input_grad[1]:
            d_lora_in = dyb @ A.to(dy.dtype)
        dA = (dyb.T @ lora_in).to(A.dtype) if A is not None and ctx.needs_input_grad[2] else None
        dB = (dy.T @ xa).to(B.dtype) if B is not None and ctx.needs_input_grad[3] else None
        dbias = dy.sum(0) if ctx.needs_input_grad[4] else None
        return dx, d_lora_in, dA, dB, dbias, None, None


FORMAT_IDS = {"bitmap": 0, "2:4": 1, "masked": 2}
BLOCK_K = SEGMENT


@triton.jit
def _prmt(a, selector):
    """What PTX `prmt.b32 d, a, 0, selector` computes (default mode), in tensor arithmetic: byte j
    of d is byte (nibble j & 7) of the eight bytes {a, 0} (4-7 are zero), or its sign bit
    replicated when the nibble's bit 3 is set. The interpreter has no inline assembly."""
    d = tl.zeros_like(a)
    for j in tl.static_range(4):
        nib = (selector >> (4 * j)) & 0xF
        byte = tl.where((nib & 7) < 4, (a >> (8 * (nib & 3))) & 0xFF, 0)
        byte = tl.where((nib & 8) != 0, tl.where((byte & 0x80) != 0, 0xFF, 0), byte)
        d = d | (byte << (8 * j))
    return d


@triton.jit
def _popc(v, EMULATE: tl.constexpr):
    """popcount of int32 `v`: PTX popc on the GPU, tensor arithmetic under the interpreter."""
    if EMULATE:
        v = v.to(tl.int64) & 0xFFFFFFFF
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        count = (((v * 0x01010101) >> 24) & 0xFF).to(tl.int32)
    else:
        count = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", args=[v], dtype=tl.int32, is_pure=True, pack=1)
    return count


# the prmt selector of a bitmap column pair by its two mask bits (0 neither column kept, 1 the
# first, 2 the second, 3 both), 16 bits each: the selectors of bits 0-1 in the first word, 2-3 in
# the second; element c of the segment is the pair word's bytes 0-1, and 0x4 names a zero byte
PAIR_SELECTORS = (0x44104444, 0x32101044)
# the prmt selector of a 2:4 selector row's address: bytes 0, 2 and 3 of the table's address
# (the second source), byte 1 = byte b of the first source (the position word's half), b = 0-3
# in bits 4-7 of the selector
ROW_ADDRESS = 0x7604
if tl.constexpr is not None:  # the kernels' view of them (Triton installed)
    _ROW_ADDRESS = tl.constexpr(ROW_ADDRESS)
    _PAIR_LOW, _PAIR_HIGH = tl.constexpr(PAIR_SELECTORS[0]), tl.constexpr(PAIR_SELECTORS[1])
    _PAIR_ASM = tl.constexpr(
        "{ .reg .b32 t, k; shl.b32 t, $3, 4; shf.r.wrap.b32 t, $1, $2, t; shr.b32 k, $4, $5; and.b32 k, k, 3; "
        f"mad.lo.u32 k, k, 0x22, 0x10; prmt.b32 k, {PAIR_SELECTORS[0]:#x}, {PAIR_SELECTORS[1]:#x}, k; "
        "prmt.b32 $0, t, 0, k; }")


@triton.jit
def _place_quad(quad, half, index, table_ptr, EMULATE: tl.constexpr):
    """The eight 16-bit lanes of two adjacent 2:4 groups, as four int32 words (lanes 0-1, 2-3, 4-5,
    6-7), from their four values (int64: the first group's pair in the low word) and their two
    position nibbles, byte `index` (0-3) of `half`, the int32 half of the row's position word that
    holds them (the first group's in bits 0-3): row `byte` of `selector_table` holds the four prmt
    selectors (16 bytes), and each word is one prmt of its group's pair. On the GPU one inline-PTX
    block: one prmt writes the byte into bits 8-15 of the table's address (64 KB aligned, 256-byte
    rows: the row's address is the table's with that byte replaced, no 64-bit arithmetic), one
    16-byte read-only load through L1 (a data-dependent read, kept out of the software pipeline)
    and four prmt. EMULATE (the interpreter) computes the
    same bits in tensor arithmetic and with _prmt."""
    select = _ROW_ADDRESS | (index << 4)
    if EMULATE:
        first = (quad & 0xFFFFFFFF).to(tl.int32)
        second = (quad >> 32).to(tl.int32)
        entry = table_ptr + 64 * ((_prmt(half, select) >> 8) & 0xFF)
        w0 = _prmt(first, tl.load(entry))
        w1 = _prmt(first, tl.load(entry + 1))
        w2 = _prmt(second, tl.load(entry + 2))
        w3 = _prmt(second, tl.load(entry + 3))
    else:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            "{ .reg .b32 s0, s1, s2, s3, v0, v1, b0, b1, lo; .reg .b64 a; mov.b64 {v0, v1}, $4; "
            "mov.b64 {b0, b1}, $7; prmt.b32 lo, $5, b0, $6; mov.b64 a, {lo, b1}; "
            "ld.global.nc.v4.b32 {s0, s1, s2, s3}, [a]; prmt.b32 $0, v0, 0, s0; prmt.b32 $1, v0, 0, s1; "
            "prmt.b32 $2, v1, 0, s2; prmt.b32 $3, v1, 0, s3; }",
            "=r,=r,=r,=r,l,r,r,l", args=[quad, half, select, table_ptr.to(tl.int64, bitcast=True)],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return w0, w1, w2, w3


@triton.jit
def _place_pair(first, second, c, half, shift, EMULATE: tl.constexpr):
    """A bitmap column pair's two 16-bit lanes (int32) at bits shift, shift + 1 of the mask half
    word `half`, where c kept columns of the segment come before the pair: elements c and c + 1 are
    the window words `first` (c // 2) and `second` (c // 2 + 1) shifted right by c % 2 halves
    (shf), and one prmt under the pair's selector (PAIR_SELECTORS, itself picked from the two
    selector words by a prmt) places element c in lane 0, lane 1 or both lanes, or zeros. On the
    GPU one inline-PTX block; EMULATE (the interpreter) computes the same bits in tensor arithmetic."""
    if EMULATE:
        both = ((second.to(tl.int64) << 32) | (first.to(tl.int64) & 0xFFFFFFFF)) >> (16 * (c & 1)).to(tl.int64)
        bits = (half >> shift) & 3
        selector = tl.where(bits < 2, _PAIR_LOW >> (16 * bits), _PAIR_HIGH >> (16 * (bits - 2))) & 0xFFFF
        pair = _prmt((both & 0xFFFFFFFF).to(tl.int32), selector)
    else:
        pair = tl.inline_asm_elementwise(_PAIR_ASM, "=r,r,r,r,r,r", args=[first, second, c, half, shift],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return pair


@triton.jit
def _weight_tile(w0_ptr, w1_ptr, w2_ptr, row0, k0, n_rows, n_cols, stride0, stride1,
                 FORMAT: tl.constexpr, BLOCK_ROWS: tl.constexpr, VALUES: tl.constexpr, EMULATE: tl.constexpr):
    """Dense (BLOCK_ROWS x 64) tile of W at rows row0.., columns k0..k0+63: zeros in columns past
    W; rows past W repeat its last row.

    bitmap: w0 = the values read as int32 pairs, w1 = the int64 mask words, w2 = the segments'
    value offsets (units of ALIGN elements); 2:4: w0 = the values read as int64 quads (one per
    two groups of four columns), w1 = the position words as int32 halves, w2 = the prmt selector table
    (`selector_table`); masked: w0 = the dense weight. VALUES is the weight dtype (2:4 and bitmap
    rebuild their elements from their bits).
    """
    # rows past W read its last row again (finite values in tile rows that the forward never stores
    # and that meet zero columns of dY in dX), so no row needs a load mask
    held = tl.minimum(row0 + tl.arange(0, BLOCK_ROWS), n_rows - 1)
    cols = k0 + tl.arange(0, 64)
    if FORMAT == 0:
        # per row one mask word and one offset; the segment's values read as one 32-word window
        # (64 elements as int32 pairs) from that 8-byte-aligned offset (the array is padded so the
        # window never leaves it). Columns are decoded in pairs: the pair's first kept column is
        # element c of the segment (c = kept columns before it), so elements c and c + 1 are the
        # window words c // 2 and c // 2 + 1 shifted by c % 2 halves, and the pair's two mask bits
        # say which of them go where (or zero)
        word = tl.load(w1_ptr + held * stride1 + k0 // 64)
        start = tl.load(w2_ptr + held * stride1 + k0 // 64).to(tl.int64) * 2
        window = tl.load(w0_ptr + tl.multiple_of(start, 2)[:, None] + tl.arange(0, 32)[None, :])
        lo, hi = word.to(tl.int32), (word >> 32).to(tl.int32)
        p = tl.arange(0, 32)[None, :]
        shift = 2 * (p % 16)
        below_lo = tl.where(p < 16, (1 << shift) - 1, -1)  # the mask bits before the pair, per half
        below_hi = tl.where(p < 16, 0, (1 << shift) - 1)
        c = _popc(lo[:, None] & below_lo, EMULATE) + _popc(hi[:, None] & below_hi, EMULATE)
        half = tl.where(p < 16, lo[:, None], hi[:, None])
        first = tl.gather(window, c >> 1, 1)
        second = tl.gather(window, ((c >> 1) + 1) & 31, 1)
        pair = _place_pair(first, second, c, half, shift, EMULATE)
        l0 = pair.to(tl.int16).to(VALUES, bitcast=True)
        l1 = (pair >> 16).to(tl.int16).to(VALUES, bitcast=True)
        tile = tl.reshape(tl.join(l0, l1), (BLOCK_ROWS, 64))
    elif FORMAT == 1:
        # one position word per row and 64 columns, read as its two int32 halves (each quad's byte
        # is then one of its half's four: no shift); the values as eight int64 quads, each the two
        # value pairs of two adjacent groups, whose two nibbles are one byte of the word; no masks,
        # the format pads every row to whole words
        halves = tl.load(w1_ptr + held[:, None] * stride1 + k0 // 32 + tl.arange(0, 2)[None, :])
        quads = 4 * tl.arange(0, 2)[:, None] + tl.arange(0, 4)[None, :]
        quad = tl.load(w0_ptr + held[:, None, None] * stride0 + (k0 // 8 + quads)[None, :, :])
        words = _place_quad(quad, halves[:, :, None], tl.arange(0, 4)[None, None, :], w2_ptr, EMULATE)
        lanes = [(w.to(tl.int16).to(VALUES, bitcast=True), (w >> 16).to(tl.int16).to(VALUES, bitcast=True))
                 for w in words]
        # lane 4i + 2j + k of the quad: word 2i + j, half k
        tile = tl.join(tl.join(tl.join(lanes[0][0], lanes[2][0]), tl.join(lanes[1][0], lanes[3][0])),
                       tl.join(tl.join(lanes[0][1], lanes[2][1]), tl.join(lanes[1][1], lanes[3][1])))
        tile = tl.reshape(tile, (BLOCK_ROWS, 64))
    else:
        tile = tl.load(w0_ptr + held[:, None] * stride0 + cols[None, :], mask=(cols < n_cols)[None, :], other=0.0)
    return tile


def _tile_configs() -> list:
    """A short list (first compiles and timings cost seconds per config): token tile x weight
    rows (the 16-row tiles are dropped by `prune_tile_configs`; the interpreter runs them)."""
    tiles = [(bm, 16, 4) for bm in (16, 32, 64, 128)]
    tiles += [(16, 32, 4), (16, 64, 4), (16, 128, 4), (32, 64, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_ROWS": br}, num_warps=warps, num_stages=3) for bm, br, warps in tiles]


def prune_tile_configs(configs, named_args, **kwargs) -> list:
    """Drop configs that cannot win: 16-row weight tiles (the narrowest MMA) and token tiles
    larger than the bucket, which only compute padding. (No kept config spills registers or overflows
    shared memory on sm_90 at fp16/bf16: benchmarks/kernel_static.py, tests/test_kernel_static.py.)"""
    bucket = named_args.get("m_bucket", kwargs.get("m_bucket", 16))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, bucket) and c.kwargs["BLOCK_ROWS"] >= 32]
    return kept or configs[:1]


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: 5 ms warm-up, 20 ms of repeats per config (triton's default is 25/100)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _autotuned(kernel):
    return triton.autotune(configs=_tile_configs(), key=["m_bucket", "n_out", "n_in", "rank", "FORMAT"],
                           prune_configs_by={"early_config_prune": prune_tile_configs}, do_bench=_quick_bench)(kernel)


def m_bucket(n_tokens: int) -> int:
    """Autotuning bucket of a token count: the next power of two, within [16, 1024]."""
    return max(16, min(triton.next_power_of_2(max(n_tokens, 1)), 1024))


@triton.jit
def _program_row(EMULATE: tl.constexpr):
    """tl.program_id(1) read again after the main loop (PTX %ctaid.y in an inline block the compiler
    may not merge with the first read), so the row offset is not live across the loop: carried
    across it, ptxas spilled it at 72 registers (the bitmap forward without LoRA, 16 x 64 tiles)."""
    if EMULATE:
        row = tl.program_id(1)
    else:
        row = tl.inline_asm_elementwise("mov.u32 $0, %ctaid.y;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    return row


@_autotuned
@triton.jit
def _forward_kernel(y_ptr, x_ptr, w0_ptr, w1_ptr, w2_ptr, xa_ptr, b_ptr, bias_ptr, n_tokens, n_out, n_in, rank,
                    m_bucket, stride_y, stride_x, stride0, stride1, stride_xa, stride_b,
                    FORMAT: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, VALUES: tl.constexpr,
                    EMULATE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_ROWS), dtype=tl.float32)
    for k0 in range(0, n_in, 64):
        cols = k0 + tl.arange(0, 64)
        x = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :],
                    mask=(tokens[:, None] < n_tokens) & (cols[None, :] < n_in), other=0.0)
        w = _weight_tile(w0_ptr, w1_ptr, w2_ptr, tl.program_id(1) * BLOCK_ROWS, k0, n_out, n_in, stride0, stride1,
                         FORMAT, BLOCK_ROWS, VALUES, EMULATE)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    rows = _program_row(EMULATE) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    if HAS_LORA:
        ranks = tl.arange(0, BLOCK_R)
        xa = tl.load(xa_ptr + tokens[:, None] * stride_xa + ranks[None, :],
                     mask=(tokens[:, None] < n_tokens) & (ranks[None, :] < rank), other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_b + ranks[None, :],
                    mask=(rows[:, None] < n_out) & (ranks[None, :] < rank), other=0.0)
        acc += tl.dot(xa, tl.trans(b.to(xa.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < n_out, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tokens[:, None] * stride_y + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(tokens[:, None] < n_tokens) & (rows[None, :] < n_out))


@_autotuned
@triton.jit
def _grad_input_kernel(dx_ptr, dy_ptr, w0_ptr, w1_ptr, w2_ptr, dyb_ptr, a_ptr, n_tokens, n_out, n_in, rank,
                       m_bucket, stride_dx, stride_dy, stride0, stride1, stride_dyb, stride_a,
                       FORMAT: tl.constexpr, HAS_LORA: tl.constexpr, VALUES: tl.constexpr, EMULATE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """dX[:, k0:k0+64] = dY @ W[:, k0:k0+64] + (s dY B) @ A[:, k0:k0+64]."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * 64
    cols = k0 + tl.arange(0, 64)
    acc = tl.zeros((BLOCK_M, 64), dtype=tl.float32)
    for r0 in range(0, n_out, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        dy = tl.load(dy_ptr + tokens[:, None] * stride_dy + rows[None, :],
                     mask=(tokens[:, None] < n_tokens) & (rows[None, :] < n_out), other=0.0)
        w = _weight_tile(w0_ptr, w1_ptr, w2_ptr, r0, k0, n_out, n_in, stride0, stride1, FORMAT, BLOCK_ROWS,
                         VALUES, EMULATE)
        acc += tl.dot(dy, w.to(dy.dtype))
    if HAS_LORA:
        ranks = tl.arange(0, BLOCK_R)
        dyb = tl.load(dyb_ptr + tokens[:, None] * stride_dyb + ranks[None, :],
                      mask=(tokens[:, None] < n_tokens) & (ranks[None, :] < rank), other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :],
                    mask=(ranks[:, None] < rank) & (cols[None, :] < n_in), other=0.0)
        acc += tl.dot(dyb, a.to(dyb.dtype))
    tl.store(dx_ptr + tokens[:, None] * stride_dx + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(tokens[:, None] < n_tokens) & (cols[None, :] < n_in))


_SELECTORS: dict = {}


def selector_table(device) -> torch.Tensor:
    """The prmt selectors of two adjacent 2:4 groups, int32 (256, 64), row = their position byte
    (the first group's nibble p0 | p1 << 2 in bits 0-3, the second's in bits 4-7), in the row's
    first four words. A group's selector word is `0x44444444 ^ 0x54 << 8*p0 ^ 0x76 << 8*p1` (byte
    j names the source of lane j's low or high byte half: 0x10 the first value's two bytes, 0x32
    the second's, 0x44 a zero byte), so lane p0 takes the first value and lane p1 the second; the
    row holds the first group's word and that word >> 16 (its lanes 0-1 and 2-3 read the low 16
    bits), then the second group's. One 64 KB table per device, 64 KB aligned, so that a row's
    address is the table's with the byte in bits 8-15 (one prmt in the kernel); the kernel reads
    the 16 bytes of the rows the weights use (at most 36 of 256 are valid 2:4 bytes) through L1."""
    key = str(device)
    if key not in _SELECTORS:
        words = [0x44444444 ^ (0x54 << 8 * (nib & 3)) ^ (0x76 << 8 * (nib >> 2)) for nib in range(16)]
        group = [[w - (1 << 32) if w >= 1 << 31 else w, w >> 16] for w in words]
        rows = [group[byte & 0xF] + group[byte >> 4] for byte in range(256)]
        storage = torch.zeros(2 * 16384, dtype=torch.int32, device=device)  # room to start at a 64 KB boundary
        skip = (-storage.data_ptr() % 65536) // 4
        table = storage[skip:skip + 16384].view(256, 64)
        table[:, :4] = torch.tensor(rows, dtype=torch.int32)
        _SELECTORS[key] = table
    return _SELECTORS[key]


def _weight_args(packed: PackedWeight):
    t = packed.tensors
    if packed.format == "bitmap":
        return t["values"].view(torch.int32), t["bitmap"], t["offsets"], 0, t["bitmap"].stride(0)
    if packed.format == "2:4":
        if t["values"].shape[1] != SEGMENT // 2 * t["meta"].shape[1]:  # two of each four columns
            raise ValueError(f"2:4 values of shape {tuple(t['values'].shape)} do not fill whole 64-column words "
                             f"(format v{packed.version}); efx_kernels.formats.upgrade converts older weights")
        quads = t["values"].view(torch.int64)
        halves = t["meta"].view(torch.int32)
        return quads, halves, selector_table(quads.device), quads.stride(0), halves.stride(0)
    return t["weight"], t["weight"], t["weight"], t["weight"].stride(0), 0


INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_ROWS": 16}


def _launch(kernel, packed: PackedWeight, tiles: dict | None):
    """The autotuned kernel on a GPU; the plain kernel with `tiles` where they are given (BLOCK_M,
    BLOCK_ROWS and optionally num_warps / num_stages: tests run every tile family that way, and the
    benchmark times each config), and with 16 x 16 tiles under the interpreter otherwise
    (autotuning times launches on a device, which the interpreter does not have)."""
    if tiles is not None:
        return kernel.fn, dict(tiles)
    if interpreting():
        return kernel.fn, dict(INTERPRETER_TILE)
    return kernel, {}


TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16} if tl.constexpr is not None else {}


def fused_forward(x2d: torch.Tensor, packed: PackedWeight, xa: torch.Tensor | None, B: torch.Tensor | None,
                  bias: torch.Tensor | None, tiles: dict | None = None) -> torch.Tensor:
    """y (M, out) = x2d @ W^T + xa @ B^T + bias, where xa = s * x2d @ A^T (computed by the caller);
    `tiles` ({"BLOCK_M", "BLOCK_ROWS"}) fixes the tile instead of the autotuner's choice."""
    n_tokens, n_in = x2d.shape
    n_out = packed.shape[0]
    y = torch.empty((n_tokens, n_out), dtype=x2d.dtype, device=x2d.device)
    w0, w1, w2, s0, s1 = _weight_args(packed)
    rank = 0 if xa is None else xa.shape[1]
    kernel, tiles_kw = _launch(_forward_kernel, packed, tiles)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_ROWS"]))  # noqa: E731
    kernel[grid](y, x2d, w0, w1, w2, xa if xa is not None else x2d, B if B is not None else x2d,
                 bias if bias is not None else x2d, n_tokens, n_out, n_in, rank, m_bucket(n_tokens), y.stride(0),
                 x2d.stride(0), s0, s1, xa.stride(0) if xa is not None else 0,
                 B.stride(0) if B is not None else 0, FORMAT=FORMAT_IDS[packed.format], HAS_LORA=xa is not None,
                 HAS_BIAS=bias is not None, VALUES=TRITON_DTYPES[packed.dtype], EMULATE=interpreting(),
                 BLOCK_R=block_for_rank(rank), **tiles_kw)
    return y


def fused_grad_input(dy: torch.Tensor, packed: PackedWeight, dyb: torch.Tensor | None, A: torch.Tensor | None,
                     tiles: dict | None = None) -> torch.Tensor:
    """dX (M, in) = dy @ W + dyb @ A, where dyb = s * dy @ B (computed by the caller)."""
    n_tokens, n_out = dy.shape
    n_in = packed.shape[1]
    dx = torch.empty((n_tokens, n_in), dtype=dy.dtype, device=dy.device)
    w0, w1, w2, s0, s1 = _weight_args(packed)
    rank = 0 if dyb is None else dyb.shape[1]
    kernel, tiles_kw = _launch(_grad_input_kernel, packed, tiles)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(n_in, 64))  # noqa: E731
    kernel[grid](dx, dy, w0, w1, w2, dyb if dyb is not None else dy, A if A is not None else dy, n_tokens, n_out,
                 n_in, rank, m_bucket(n_tokens), dx.stride(0), dy.stride(0), s0, s1,
                 dyb.stride(0) if dyb is not None else 0, A.stride(0) if A is not None else 0,
                 FORMAT=FORMAT_IDS[packed.format], HAS_LORA=dyb is not None, VALUES=TRITON_DTYPES[packed.dtype],
                 EMULATE=interpreting(), BLOCK_R=block_for_rank(rank), **tiles_kw)
    return dx
