"""Plain-torch versions of every efx kernel: the truth the Triton kernels are tested against,
and the path used on CPUs and wherever Triton is missing."""
from __future__ import annotations

import torch


def _token_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x flattened to (tokens, n) with padding tokens removed."""
    rows = x.reshape(-1, x.shape[-1])
    if token_mask is not None:
        rows = rows[token_mask.reshape(-1).to(torch.bool)]
    return rows


def accumulate_act_sq(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
    """acc (n, fp32) += sum over tokens of x**2; returns the number of tokens counted."""
    rows = _token_rows(x, token_mask).float()
    acc += (rows * rows).sum(0)
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
    U = W.float()
    if A is not None and B is not None and A.numel():
        U = U + scale * (B.float() @ A.float())
    score = U.abs() * act_stat.float()[None, :]
    if row_factor is not None:
        score = score * row_factor.float()[:, None]
    if col_factor is not None:
        score = score * expand_col_factor(col_factor.float(), W.shape[0])
    if prev is not None and eta != 1.0:
        score = eta * score + (1.0 - eta) * prev.float()
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


def effective(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """U = W + scale * B @ A in fp32, a new tensor (one fused multiply-add pass)."""
    return torch.addmm(W.float(), B.float(), A.float(), alpha=scale)


def _pbs_rhs(W, A, B, scale, keep_mask, act_sq, dtype=torch.float32) -> torch.Tensor:
    """-s * (P * U) D A^T, (m, r): D is folded into the small A, so the m x n work is one
    effective-weight pass, one masking multiply and one GEMM."""
    # a uint8 multiply streams; bool-indexed selects are several times slower on CPUs
    pruned_u = effective(W, A, B, scale).mul_((~keep_mask).view(torch.uint8)).to(dtype)
    return (pruned_u @ (A.to(dtype) * act_sq.to(dtype)).T).mul_(-scale)


def pbs_delta_keep1(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, keep_mask: torch.Tensor,
                    act_sq: torch.Tensor, ridge: float) -> torch.Tensor:
    """dB for keep_weight = 1: -s * ((P*U) D A^T) (s^2 A D A^T + ridge I)^-1, (m, r) fp32.

    The r x r system is formed and solved in fp64 (it is tiny; fp32 would lose the ridge)."""
    A64, g = A.double(), act_sq.double()
    rhs = _pbs_rhs(W, A, B, scale, keep_mask, act_sq)
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
    grams = (keep_weight * full + (1.0 - keep_weight) * (prune_mask.to(work) @ outer)).reshape(-1, r, r).double()
    grams = scale * scale * grams + ridge * torch.eye(r, dtype=torch.float64, device=A.device)
    rhs = _pbs_rhs(W, A, B, scale, ~prune_mask, act_sq, work).double()
    return torch.linalg.solve(grams, rhs[..., None])[..., 0].float()


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
