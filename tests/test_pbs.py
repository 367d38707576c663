"""Partial Brain Surgeon against a per-row float64 solve of the objective in method.md."""
import pytest
import torch

from efx.method.pbs import all_finite, hessian_pbs, partial_brain_surgeon


def per_row_reference(W, A, B, keep, g, scale, keep_weight, ridge, max_pruned=None, dtype=torch.float64):
    """The authors' formulation: a Python loop over rows with one r x r solve each (also the
    baseline of benchmarks/pbs_speed.py, run there in fp32)."""
    W, A, B, g = W.to(dtype), A.to(dtype), B.to(dtype), g.to(dtype)
    U = W + scale * B @ A
    out = B.clone()
    r = A.shape[0]
    for i in range(W.shape[0]):
        pruned = (~keep[i]).nonzero().flatten()
        if max_pruned is not None and len(pruned) > max_pruned:
            pruned = pruned[U[i, pruned].abs().argsort(descending=True)[:max_pruned]]
        if len(pruned) == 0:
            continue
        in_s = torch.zeros(W.shape[1], dtype=torch.bool)
        in_s[pruned] = True
        weights = torch.where(in_s, g, keep_weight * g)
        gram = (A * weights) @ A.T
        rhs = -scale * (A[:, in_s] * (g[in_s] * U[i, in_s])).sum(1)
        out[i] += torch.linalg.solve(scale**2 * gram + ridge * torch.eye(r, dtype=dtype), rhs)
    return out


def problem(m=24, n=40, r=8, sparsity=0.5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen)
    A = torch.randn(r, n, generator=gen) / n**0.5
    B = torch.randn(m, r, generator=gen) * 0.1
    g = torch.rand(n, generator=gen) + 0.1
    keep = torch.rand(m, n, generator=gen) > sparsity
    keep[0] = True          # a row with nothing pruned
    keep[1] = False         # a fully pruned row
    return W.to(dtype), A.to(dtype), B.to(dtype), keep, g


@pytest.mark.parametrize("keep_weight", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("max_pruned", [None, 3])
@pytest.mark.parametrize("r", [1, 8])
def test_matches_per_row_solve(keep_weight, max_pruned, r):
    W, A, B, keep, g = problem(r=r)
    got = partial_brain_surgeon(W, A, B, keep, g, scale=2.0, keep_weight=keep_weight, ridge=1e-6,
                                max_pruned_per_row=max_pruned)
    want = per_row_reference(W, A, B, keep, g, 2.0, keep_weight, 1e-6, max_pruned)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5)
    assert torch.equal(got[0], B[0]), "a row with nothing pruned must come back unchanged"


@pytest.mark.parametrize("keep_weight", [1.0, 0.5, 0.0])
def test_row_blocks_and_held_buffers_give_the_same_answer(monkeypatch, keep_weight):
    """The CPU path walks rows in blocks through buffers it keeps between calls: a layer split into
    uneven blocks must solve exactly as before, and a second call must not touch the first's result."""
    import efx_kernels.pbs as pbs_kernels
    W, A, B, keep, g = problem(m=23, n=40)
    whole = partial_brain_surgeon(W, A, B, keep, g, scale=2.0, keep_weight=keep_weight, ridge=1e-6)
    monkeypatch.setattr(pbs_kernels, "BLOCK_ELEMENTS", 5 * 40)       # blocks of 5 rows, the last of 3
    pbs_kernels.release_buffers()
    blocked = partial_brain_surgeon(W, A, B, keep, g, scale=2.0, keep_weight=keep_weight, ridge=1e-6)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-7)
    kept = blocked.clone()
    W2, A2, B2, keep2, g2 = problem(m=23, n=40, seed=1)
    partial_brain_surgeon(W2, A2, B2, keep2, g2, scale=2.0, keep_weight=keep_weight, ridge=1e-6)
    assert torch.equal(blocked, kept)
    want = per_row_reference(W, A, B, keep, g, 2.0, keep_weight, 1e-6)
    torch.testing.assert_close(blocked.double(), want, rtol=2e-4, atol=2e-5)


def test_update_lowers_the_objective():
    W, A, B, keep, g = problem()
    new_b = partial_brain_surgeon(W, A, B, keep, g, scale=2.0)

    def objective(b):
        delta = 2.0 * (b - B) @ A
        U = W + 2.0 * B @ A
        return (((U + delta) * ~keep).pow(2) * g).sum() + ((delta * keep).pow(2) * g).sum()

    assert objective(new_b) < objective(B)


def test_rank_deficient_A_is_handled_by_the_ridge():
    W, A, B, keep, g = problem(r=8)
    A[4:] = A[:4]  # rank 4
    got = partial_brain_surgeon(W, A, B, keep, g, scale=1.0, keep_weight=0.0, ridge=1e-6)
    assert torch.isfinite(got).all()
    want = per_row_reference(W, A, B, keep, g, 1.0, 0.0, 1e-6)
    torch.testing.assert_close(got.double() @ A.double(), want @ A.double(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32_returned_in_b_dtype(dtype):
    W, A, B, keep, g = problem(dtype=dtype)
    got = partial_brain_surgeon(W, A, B, keep, g, scale=2.0)
    assert got.dtype == dtype
    want = per_row_reference(W.float(), A.float(), B.float(), keep, g, 2.0, 1.0, 1e-8)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_bad_inputs_are_named():
    W, A, B, keep, g = problem()
    with pytest.raises(ValueError, match="act_sq"):
        partial_brain_surgeon(W, A, B, keep, g[:-1])
    with pytest.raises(ValueError, match="keep_mask"):
        partial_brain_surgeon(W, A, B, keep.float(), g)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        partial_brain_surgeon(W, A, B, keep, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_is_the_element_wise_check(dtype):
    big = torch.finfo(dtype).max
    t = torch.full((64, 64), big / 2, dtype=dtype)  # finite, but its sum overflows
    assert not torch.isfinite(t.sum()) and all_finite(t)
    assert all_finite(torch.randn(5, 7).to(dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = torch.randn(5, 7).to(dtype)
        u[3, 2] = bad
        assert not all_finite(u)
    mixed = torch.zeros(4, dtype=dtype)
    mixed[0], mixed[1] = float("inf"), -float("inf")  # sums to NaN
    assert not all_finite(mixed)


def test_hessian_pbs_matches_per_row_solve():
    W, A, B, keep, g = problem(m=10, n=16, r=4)
    X = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    H = X.T @ X / 64
    got = hessian_pbs(W, A, B, keep, H, scale=2.0, ridge=1e-6)
    U = (W + 2.0 * B @ A).double()
    for i in range(W.shape[0]):
        At = A.double() * keep[i].double()
        lhs = 4.0 * At @ H.double() @ At.T + 1e-6 * torch.eye(4, dtype=torch.float64)
        rhs = 2.0 * At @ H.double() @ (U[i] * (~keep[i]).double())
        want = B[i].double() + torch.linalg.solve(lhs, rhs)
        if keep[i].all():
            want = B[i].double()
        torch.testing.assert_close(got[i].double(), want, rtol=1e-3, atol=1e-4)
