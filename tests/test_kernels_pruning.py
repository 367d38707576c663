"""Pruning ops against their torch references, on both paths: the Triton kernels (under
TRITON_INTERPRET=1 on a CPU) and the torch fast paths.

Tolerances: fp32 inputs 1e-5 relative; fp16/bf16 inputs are upcast to fp32 inside the
kernels, so the same fp32 tolerance applies to the upcast reference.
"""
import os

import pytest
import torch

from efx_kernels.act_stats import accumulate_act_sq_reference
from efx_kernels.foresight import foresight_score_reference, nm_keep_mask
from efx_kernels.pbs import pbs_delta_reference, row_solve_triton
from efx_kernels.dispatch import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
# benchmarks/gpu_check.sh sets EFX_TEST_DEVICE=cuda to run the same tests compiled for a GPU
DEVICE = os.environ.get("EFX_TEST_DEVICE", "cpu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, params=["triton", "torch"])
def path(request, monkeypatch):
    """Every op runs twice against its reference: the Triton kernel and the torch fast path."""
    monkeypatch.setenv("EFX_KERNELS", request.param)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 37, 129), (200, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_act_sq(dtype, shape, masked):
    import efx_kernels
    x = rand(*shape, dtype=dtype)
    mask = None
    if masked:
        mask = (torch.rand(shape[:-1], generator=torch.Generator().manual_seed(1)) > 0.3).to(DEVICE)
    got, want = torch.full((shape[-1],), 0.5, device=DEVICE), torch.full((shape[-1],), 0.5, device=DEVICE)
    n_got = efx_kernels.accumulate_act_sq(x, got, mask)
    n_want = accumulate_act_sq_reference(x, want, mask)
    assert n_got == n_want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_act_sq_all_padding():
    import efx_kernels
    x = rand(2, 5, 16)
    acc = torch.zeros(16, device=DEVICE)
    assert efx_kernels.accumulate_act_sq(x, acc, torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)) == 0
    assert not acc.any()


def score_case(m, n, r, dtype, seed=0):
    W = rand(m, n, seed=seed, dtype=dtype)
    A = rand(r, n, seed=seed + 1, dtype=dtype) * 0.3 if r else None
    B = rand(m, r, seed=seed + 2, dtype=dtype) * 0.3 if r else None
    stat = rand(n, seed=seed + 3).abs()
    return W, A, B, stat


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, r", [(1, 8, 1), (33, 70, 8), (17, 130, 16), (9, 24, 64), (40, 33, 0)])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_foresight_score(dtype, m, n, r, eta):
    import efx_kernels
    W, A, B, stat = score_case(m, n, r, dtype)
    row = rand(m, seed=7).abs()
    prev = rand(m, n, seed=8).abs()
    got = efx_kernels.foresight_score(W, A, B, 2.0, stat, row_factor=row, prev=prev, eta=eta)
    want = foresight_score_reference(W, A, B, 2.0, stat, row, None, prev, eta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 3])
def test_foresight_score_column_factors(groups):
    import efx_kernels
    W, A, B, stat = score_case(12, 20, 4, torch.float32)
    col = rand(groups, 20, seed=9).abs() if groups > 1 else rand(20, seed=9).abs()
    got = efx_kernels.foresight_score(W, A, B, 0.5, stat, col_factor=col, out_dtype=torch.bfloat16)
    want = foresight_score_reference(W, A, B, 0.5, stat, None, col, None, 1.0, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [0, 8])
def test_fused_nm_keep_mask(pattern, dtype, r):
    import efx_kernels
    W, A, B, stat = score_case(13, 40, r, dtype)
    W[0] = 0  # an all-tied row: the lower columns must win
    if B is not None:
        B[0] = 0
    row = rand(13, seed=4).abs()
    got = efx_kernels.foresight_nm_keep_mask(W, A, B, 1.5, stat, *pattern, row_factor=row,
                                             prev=rand(13, 40, seed=5).abs(), eta=0.5)
    score = foresight_score_reference(W, A, B, 1.5, stat, row, None, rand(13, 40, seed=5).abs(), 0.5)
    want = nm_keep_mask(score, *pattern)
    assert torch.equal(got, want)
    assert (got.reshape(13, -1, pattern[1]).sum(-1) == pattern[0]).all()


def test_the_fixture_really_selects_the_path(path):
    from efx_kernels.dispatch import use_triton
    assert use_triton(torch.zeros(2, device=DEVICE)) == (path == "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, r", [(1, 9, 1), (37, 70, 8), (20, 33, 16), (6, 90, 64)])
@pytest.mark.parametrize("keep_weight", [1.0, 0.5])
def test_pbs_kernels(dtype, m, n, r, keep_weight):
    import efx_kernels
    W, A, B, stat = score_case(m, n, r, dtype)
    keep = (torch.rand(m, n, generator=torch.Generator().manual_seed(3)) > 0.5).to(DEVICE)
    keep[0] = True
    if m > 1:
        keep[1] = False
    g = stat + 0.1
    if keep_weight == 1.0:
        got = efx_kernels.pbs_delta_keep1(W, A, B, 2.0, keep, g, 1e-6)
        want = pbs_delta_reference(W, A, B, 2.0, ~keep, g, 1.0, 1e-6)
    else:
        got = efx_kernels.pbs_delta_general(W, A, B, 2.0, ~keep, g, keep_weight, 1e-6)
        want = pbs_delta_reference(W, A, B, 2.0, ~keep, g, keep_weight, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_fused_pbs_row_solve_refuses_keep_weight_zero():
    # keep_weight 0 can leave a Gram singular up to the ridge: only the fp64 reference solves it
    W, A, B, stat = score_case(6, 40, 8, torch.float32)
    prune = torch.rand(6, 40, generator=torch.Generator().manual_seed(4)) > 0.5
    with pytest.raises(ValueError, match="keep_weight"):
        row_solve_triton(W, A, B, 2.0, prune.to(DEVICE), stat + 0.1, 0.0, 1e-6)
