"""The fused sparse + LoRA matmul against the torch reference, forward and gradients, under
TRITON_INTERPRET=1: fp16 (bf16 tl.dot is not trustworthy in the interpreter; it is checked on a
GPU), every tile family the autotuner can pick, and the dtypes the kernels refuse. Tolerances:
fp16 1e-2 relative to output scale."""
import contextlib
import functools
import os

import pytest
import torch

from efx_kernels import pack, sparse_lora_linear
from efx_kernels.dispatch import triton_available
from efx_kernels.sparse_lora import sparse_lora_linear_reference as reference

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
# benchmarks/gpu_check.sh sets EFX_TEST_DEVICE=cuda to run the same tests compiled for a GPU
DEVICE = os.environ.get("EFX_TEST_DEVICE", "cpu")
TOL = {torch.float16: dict(rtol=1e-2, atol=2e-2), torch.bfloat16: dict(rtol=4e-2, atol=8e-2)}
# bf16 tl.dot is not trustworthy under the interpreter: bf16 runs on GPUs only
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE != "cpu" else [])


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("EFX_KERNELS", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def weight_and_mask(fmt, m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen)
    if fmt == "2:4":
        order = torch.rand(m, n // 4, 4, generator=gen).argsort(-1)[..., :2]
        keep = torch.zeros(m, n // 4, 4, dtype=torch.bool).scatter_(-1, order, True).reshape(m, n)
    else:
        keep = torch.rand(m, n, generator=gen) > 0.45
    keep[0] = False                  # an empty row
    keep[-1] = fmt != "2:4" or keep[-1]
    if fmt == "bitmap" and m > 16:
        keep[:16, :64] = True        # full 64-column segments: a window of 64 values
    return w * keep, keep


def check_against_reference(fmt, dtype, tokens, m, n, r, tiles=None):
    """Forward and all gradients of the fused op (with `tiles` fixed, when given) against the
    fp32 torch reference on the same fp16/bf16-rounded inputs."""
    w, keep = weight_and_mask(fmt, m, n, seed=tokens + m)
    w, keep = w.to(DEVICE), keep.to(DEVICE)
    packed = pack(w.to(dtype), keep, fmt)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, n, generator=gen).to(DEVICE, dtype).requires_grad_()
    A = (torch.randn(r, n, generator=gen) * 0.2).to(DEVICE, dtype).requires_grad_() if r else None
    B = (torch.randn(m, r, generator=gen) * 0.2).to(DEVICE, dtype).requires_grad_() if r else None
    bias = torch.randn(m, generator=gen).to(DEVICE, dtype).requires_grad_()
    if tiles is None:
        y = sparse_lora_linear(x, packed, A, B, 1.5, bias)
    else:
        with pinned_tiles(tiles):
            y = sparse_lora_linear(x, packed, A, B, 1.5, bias)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    if tiles is None:
        y.backward(dy)
    else:
        with pinned_tiles(tiles):
            y.backward(dy)
    got = [t.grad.clone() for t in (x, A, B, bias) if t is not None]

    xr = x.detach().float().requires_grad_()
    Ar = A.detach().float().requires_grad_() if r else None
    Br = B.detach().float().requires_grad_() if r else None
    br = bias.detach().float().requires_grad_()
    yr = reference(xr, w.to(dtype).float(), Ar, Br, 1.5, br)
    yr.backward(dy.float())
    want = [t.grad for t in (xr, Ar, Br, br) if t is not None]
    torch.testing.assert_close(y.float(), yr, **TOL[dtype])
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g.float(), w_, **TOL[dtype])


@contextlib.contextmanager
def pinned_tiles(tiles):
    """Run the fused op with fixed tiles (what the autotuner would launch with that config)."""
    import efx_kernels.sparse_lora as sl
    forward, grad_input = sl.fused_forward, sl.fused_grad_input
    sl.fused_forward = functools.partial(forward, tiles=tiles)
    sl.fused_grad_input = functools.partial(grad_input, tiles=tiles)
    try:
        yield
    finally:
        sl.fused_forward, sl.fused_grad_input = forward, grad_input


@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "masked"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, m, n, r", [(1, 20, 68, 1), (5, 33, 136, 8), (17, 48, 64, 16), (3, 16, 200, 0)])
def test_forward_and_gradients(fmt, dtype, tokens, m, n, r):
    check_against_reference(fmt, dtype, tokens, m, n, r)


def _tile_families():
    """Each (BLOCK_M, BLOCK_ROWS) the autotuner may run for each format, at a decode and a
    prefill bucket."""
    from efx_kernels.sparse_lora import FORMAT_IDS, _tile_configs, prune_tile_configs
    families = set()
    for fmt, fmt_id in FORMAT_IDS.items():
        for bucket in (16, 1024):
            for c in prune_tile_configs(_tile_configs(), {"m_bucket": bucket}, FORMAT=fmt_id):
                families.add((fmt, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_ROWS"]))
    return sorted(families)


@pytest.mark.parametrize("fmt, block_m, block_rows", _tile_families())
def test_every_tile_family_against_the_reference(fmt, block_m, block_rows):
    # rows and tokens that leave a partial tile in both directions, odd LoRA rank
    check_against_reference(fmt, torch.float16, 19, block_rows + 5, 136, 3,
                            tiles={"BLOCK_M": block_m, "BLOCK_ROWS": block_rows})


def test_fp32_is_refused_by_the_kernels_and_runs_the_torch_path_in_auto(monkeypatch):
    w, keep = weight_and_mask("2:4", 20, 64, 0)
    packed = pack(w.to(DEVICE), keep.to(DEVICE), "2:4")
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="fp16 or bf16, got x torch.float32"):
        sparse_lora_linear(x, packed, None, None, 1.0)
    monkeypatch.setenv("EFX_KERNELS", "auto")
    torch.testing.assert_close(sparse_lora_linear(x, packed, None, None, 1.0), x @ w.to(DEVICE).T)


def test_a_2_4_weight_in_the_version_3_layout_is_refused_with_the_converter_named():
    from efx_kernels.formats import PackedWeight, upgrade
    w, keep = weight_and_mask("2:4", 20, 68, 0)
    current = pack(w.to(DEVICE, torch.float16), keep.to(DEVICE), "2:4")
    v3 = PackedWeight("2:4", current.shape, current.dtype,
                      {"values": current.tensors["values"][:, :34].contiguous(), "meta": current.tensors["meta"]}, 3)
    x = torch.randn(3, 68, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not fill whole 64-column words .format v3.*upgrade"):
        sparse_lora_linear(x, v3, None, None, 1.0)
    torch.testing.assert_close(sparse_lora_linear(x, upgrade(v3), None, None, 1.0).float(),
                               x.float() @ w.to(DEVICE, torch.float16).float().T, **TOL[torch.float16])


def test_dropout_input_gets_its_own_gradient():
    w, keep = weight_and_mask("bitmap", 20, 64, 0)
    w, keep = w.to(DEVICE).half(), keep.to(DEVICE)
    packed = pack(w, keep, "bitmap")
    x = torch.randn(4, 64, device=DEVICE).half().requires_grad_()
    A, B = (torch.randn(8, 64) * 0.1).half().to(DEVICE), (torch.randn(20, 8) * 0.1).half().to(DEVICE)
    lora_in = x * 2.0
    sparse_lora_linear(x, packed, A, B, 1.0, None, lora_input=lora_in).sum().backward()
    ones = torch.ones(4, 20, device=DEVICE)
    want = ones @ w.float() + 2.0 * (ones @ B.float()) @ A.float()
    torch.testing.assert_close(x.grad.float(), want, **TOL[torch.float16])


def test_leading_dims_and_shape_errors():
    w, keep = weight_and_mask("bitmap", 16, 64, 0)
    packed = pack(w.to(DEVICE).half(), keep.to(DEVICE), "bitmap")
    x = torch.randn(2, 3, 64, device=DEVICE).half()
    assert sparse_lora_linear(x, packed, None, None, 1.0).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="features"):
        sparse_lora_linear(torch.randn(2, 63, device=DEVICE), packed, None, None, 1.0)


def test_autotune_configs_fit_the_format_and_bucket():
    from efx_kernels.sparse_lora import FORMAT_IDS, _tile_configs, m_bucket, prune_tile_configs
    assert [m_bucket(t) for t in (1, 16, 17, 64, 300, 5000)] == [16, 16, 32, 64, 512, 1024]
    configs = _tile_configs()
    decode_bitmap = prune_tile_configs(configs, {"m_bucket": 16}, FORMAT=FORMAT_IDS["bitmap"])
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_ROWS"]) for c in decode_bitmap} == {(16, 32), (16, 64), (16, 128)}
    prefill_24 = prune_tile_configs(configs, {"m_bucket": 1024}, FORMAT=FORMAT_IDS["2:4"])
    assert {c.kwargs["BLOCK_M"] for c in prefill_24} == {16, 32, 64, 128}
    assert all(c.kwargs["BLOCK_M"] == 16 for c in prune_tile_configs(configs, {"m_bucket": 16}, FORMAT=1))
    assert all(c.kwargs["BLOCK_ROWS"] >= 32 for c in prefill_24)


def prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): byte j of the result is byte (nibble j of the selector) & 7
    of the eight bytes {b, a}, or that byte's sign replicated when the nibble's bit 3 is set."""
    source = (a & 0xFFFFFFFF) | (b & 0xFFFFFFFF) << 32
    out = 0
    for j in range(4):
        nib = selector >> 4 * j & 0xF
        byte = source >> 8 * (nib & 7) & 0xFF
        out |= (0xFF if byte & 0x80 else 0) << 8 * j if nib & 8 else byte << 8 * j
    return out


def test_the_byte_permute_selectors_place_what_the_masks_keep():
    """The constants of the GPU decode's inline PTX, which the interpreter cannot run: a 2:4
    group's two selectors (selector_table, by the position byte of two groups) put its value pair
    at its two positions, and ROW_ADDRESS makes a row's address from the byte; a bitmap
    column pair's selector, picked from PAIR_SELECTORS by prmt with index 0x10 + 0x22 * bits as
    the inline PTX does, puts element c (the pair word's low half) where the pair's mask bits say."""
    from efx_kernels.sparse_lora import PAIR_SELECTORS, ROW_ADDRESS, selector_table
    table = selector_table("cpu")
    first, second = 0xAAAA, 0xBBBB
    pair = first | second << 16
    nibbles = [p0 | p1 << 2 for p0 in range(4) for p1 in range(p0 + 1, 4)]
    for nib_a in nibbles:
        for nib_b in nibbles:
            entry = [int(v) & 0xFFFFFFFF for v in table[nib_a | nib_b << 4, :4]]
            for group, nib in enumerate((nib_a, nib_b)):
                low, high = entry[2 * group], entry[2 * group + 1]
                lanes = [prmt(pair, 0, low) & 0xFFFF, prmt(pair, 0, low) >> 16,
                         prmt(pair, 0, high) & 0xFFFF, prmt(pair, 0, high) >> 16]
                assert lanes == [first if j == nib & 3 else second if j == nib >> 2 else 0 for j in range(4)]
    # the row's address: the half of the position word that holds byte i (shf.r.clamp by 32 * (i >> 2)),
    # then one prmt into the 64 KB aligned table's address
    word, base = 0x8877665544332211, table.data_ptr()
    assert base % 65536 == 0 and table.stride() == (64, 1)
    for i in range(8):
        half = word >> 32 * (i >> 2) & 0xFFFFFFFF
        low = prmt(half, base & 0xFFFFFFFF, ROW_ADDRESS | (i & 3) << 4)
        assert (base >> 32 << 32 | low) == base + 256 * (word >> 8 * i & 0xFF), i
    element, following = 0x1234, 0x5678  # elements c and c + 1, after the shift by c % 2 halves
    for bits in range(4):
        selector = prmt(*PAIR_SELECTORS, 0x10 + 0x22 * bits) & 0xFFFF
        lanes = prmt(element | following << 16, 0, selector)
        expected = {0: 0, 1: element, 2: element << 16, 3: element | following << 16}[bits]
        assert lanes == expected, bits
