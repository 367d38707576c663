"""Plain-torch versions of every efx kernel: the truth the Triton kernels are tested against,
and the path used on CPUs and wherever Triton is missing."""
from __future__ import annotations

import torch

from efx_kernels.scratch import row_block, scratch


def _token_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x flattened to (tokens, n) with padding tokens removed."""
    rows = x.reshape(-1, x.shape[-1])
    if token_mask is not None:
        rows = rows[token_mask.reshape(-1).to(torch.bool)]
    return rows


def accumulate_act_sq(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
    """acc (n, fp32) += sum over tokens of x**2; returns the number of tokens counted. Where the
    rows are already a copy (padding removed, or converted to fp32) they are squared in place."""
    rows = _token_rows(x, token_mask).float()
    copied = rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    squares = rows.mul_(rows) if copied else rows * rows
    acc += squares.sum(0)
    return rows.shape[0]


def accumulate_hessian(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
    """acc (n x n, fp32) += x^T x over tokens; returns the number of tokens counted."""
    rows = _token_rows(x, token_mask).float()
    acc += rows.T @ rows
    return rows.shape[0]


def expand_col_factor(col_factor: torch.Tensor, m: int) -> torch.Tensor:
    """A column factor of shape (n,) or per row group (groups, n) as an (m, n) or (1, n) tensor:
    group g covers rows [g*m/groups, (g+1)*m/groups)."""
    if col_factor.dim() == 1:
        return col_factor[None, :]
    groups = col_factor.shape[0]
    return col_factor.repeat_interleave(m // groups, dim=0)


def foresight_score(W: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, scale: float,
                    act_stat: torch.Tensor, row_factor: torch.Tensor | None = None,
                    col_factor: torch.Tensor | None = None, prev: torch.Tensor | None = None, eta: float = 1.0,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """eta * |W + scale * B @ A| * act_stat * row_factor * col_factor + (1 - eta) * prev.

    Shapes: W (m, n); A (r, n); B (m, r); act_stat (n,) (the caller passes sqrt(E[x^2]) or the
    paper's statistic); row_factor (m,); col_factor (n,) or (groups, n) per group of rows;
    prev (m, n). Computed in fp32, returned in `out_dtype` (default fp32).
    """
    if A is not None and B is not None and A.numel():
        score = torch.addmm(W.float(), B.float(), A.float(), alpha=scale).abs_()
    else:
        score = W.float().abs()  # a fresh tensor: W.float() may be W itself
    # one m x n tensor, updated in place: each step is one pass over it
    score.mul_(act_stat.float()[None, :])
    if row_factor is not None:
        score.mul_(row_factor.float()[:, None])
    if col_factor is not None:
        score.mul_(expand_col_factor(col_factor.float(), W.shape[0]))
    if prev is not None and eta != 1.0:
        score.mul_(eta).add_(prev, alpha=1.0 - eta)
    return score.to(out_dtype or torch.float32)


def nm_keep_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in each group of m consecutive columns of every row. Ties go to
    the lower column index (stable sort), so the result is deterministic."""
    rows, cols = score.shape
    groups = score.float().reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def _pruned_products(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, mask: torch.Tensor,
                     mask_keeps: bool, act_sq: torch.Tensor, dtype: torch.dtype,
                     outer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two products PBS needs of P * U, with U = W + scale * B @ A and P the pruned positions
    (`mask` is the kept set when `mask_keeps`, else the pruned set):
    rhs = -s (P * U) D A^T, (m, r), and, when `outer` (n, k) is given, P @ outer, (m, k).

    Row blocks through scratch buffers (efx_kernels.scratch): no m x n temporary, and no fresh
    multi-MiB allocation per call. D is folded into the small A, so each block costs one fused
    multiply-add, one masking multiply and one GEMM (two with `outer`).
    """
    m, n = W.shape
    device = W.device
    a = A.to(dtype)
    coeff = (a * act_sq.to(dtype)).T
    rhs = torch.empty(m, A.shape[0], dtype=dtype, device=device)
    products = None if outer is None else torch.empty(m, outer.shape[1], dtype=dtype, device=device)
    rows = row_block(m, n, device)
    for start in range(0, m, rows):
        block = slice(start, min(start + rows, m))
        u = scratch("pbs_u", (block.stop - start, n), dtype, device).copy_(W[block])
        u.addmm_(B[block].to(dtype), a, alpha=scale)
        pruned = mask[block]
        if mask_keeps:
            pruned = torch.logical_not(pruned, out=scratch("pbs_pruned", tuple(pruned.shape), torch.bool, device))
        if outer is None:
            # a uint8 multiply streams; bool-indexed selects and masked_fill_ are several times slower on CPUs
            u.mul_(pruned.view(torch.uint8))
        else:
            p = scratch("pbs_pruned_values", tuple(u.shape), dtype, device).copy_(pruned)
            u.mul_(p)
            torch.mm(p, outer, out=products[block])
        torch.mm(u, coeff, out=rhs[block])
    return rhs.mul_(-scale), products


def pbs_delta_keep1(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, keep_mask: torch.Tensor,
                    act_sq: torch.Tensor, ridge: float) -> torch.Tensor:
    """dB for keep_weight = 1: -s * ((P*U) D A^T) (s^2 A D A^T + ridge I)^-1, (m, r) fp32.

    The r x r system is formed and solved in fp64 (it is tiny; fp32 would lose the ridge)."""
    A64, g = A.double(), act_sq.double()
    rhs, _ = _pruned_products(W, A, B, scale, keep_mask, True, act_sq, torch.float32)
    gram = scale * scale * (A64 * g) @ A64.T + ridge * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    return torch.linalg.solve(gram, rhs.double().T).T.float()


def pbs_delta_general(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, prune_mask: torch.Tensor,
                      act_sq: torch.Tensor, keep_weight: float, ridge: float) -> torch.Tensor:
    """dB for any keep_weight: one r x r system per row, all formed with two GEMMs (method.md
    section 4) and solved in one batched fp64 call, so that rank-deficient rows (fewer pruned
    columns than r, keep_weight 0) are decided by the ridge, not by rounding.

    `prune_mask` (m, n) bool is S_i per row; its complement is K_i.
    """
    # keep_weight > 0 bounds every Gram below by keep_weight * A D A^T: fp32 GEMMs suffice; at 0
    # a row's Gram can be singular and only fp64 keeps the ridge meaningful
    work = torch.float32 if keep_weight > 0 else torch.float64
    Aw, g = A.to(work), act_sq.to(work)
    r, n = A.shape
    outer = (g[:, None, None] * Aw.T[:, :, None] * Aw.T[:, None, :]).reshape(n, r * r)  # K[j, (a, b)]
    full = ((Aw * g) @ Aw.T).reshape(1, r * r)
    rhs, pruned_grams = _pruned_products(W, A, B, scale, prune_mask, False, act_sq, work, outer)
    grams = (keep_weight * full + (1.0 - keep_weight) * pruned_grams).reshape(-1, r, r).double()
    grams = scale * scale * grams + ridge * torch.eye(r, dtype=torch.float64, device=A.device)
    return torch.linalg.solve(grams, rhs.double()[..., None])[..., 0].float()


def hessian_pbs_delta(U: torch.Tensor, keep_mask: torch.Tensor, A: torch.Tensor, H: torch.Tensor, scale: float,
                      ridge: float, block_rows: int = 64) -> torch.Tensor:
    """dB minimizing ||s db (A * M_i) - P_i * U_i||_H^2 + ridge ||db||^2 per row, in row blocks:
    (s^2 At_i H At_i^T + ridge I) db = s At_i H (P_i * U_i)^T with At_i = A with pruned columns zeroed."""
    A, H = A.float(), H.float()
    m, r = U.shape[0], A.shape[0]
    out = torch.zeros(m, r, dtype=torch.float32, device=U.device)
    eye = torch.eye(r, dtype=torch.float64, device=U.device)
    for start in range(0, m, block_rows):
        keep = keep_mask[start:start + block_rows].float()
        pruned_u = U[start:start + block_rows].float() * (1.0 - keep)
        masked_a = A[None, :, :] * keep[:, None, :]                      # (b, r, n)
        a_h = masked_a @ H                                               # (b, r, n)
        gram = scale * scale * (a_h @ masked_a.transpose(1, 2)) + ridge * eye
        rhs = scale * (a_h @ pruned_u[:, :, None])                       # (b, r, 1)
        out[start:start + block_rows] = torch.linalg.solve(gram.double(), rhs.double())[..., 0].float()
    return out


def sparse_lora_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + scale * (x @ A^T) @ B^T + bias with W the dense (zeros where pruned) base."""
    y = x @ weight.T.to(x.dtype)
    if A is not None and A.numel():
        y = y + scale * ((x @ A.T.to(x.dtype)) @ B.T.to(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
