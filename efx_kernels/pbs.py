"""Batched Partial Brain Surgeon kernels.

keep_weight = 1: one pass over W computes (P*U) D A^T with U = W + s*B@A formed on chip and
the mask applied on the fly (neither U nor P*U goes to memory); the single r x r system is
solved by torch.

General keep_weight > 0: one program per row streams W[i], A and the mask once, accumulates
its Gram G_i = A diag(g_j (keep_weight + (1 - keep_weight) [j in S_i])) A^T with a tensor-core
dot and its right-hand side beside it, then factors s^2 G_i + ridge I by Cholesky and solves,
all in registers (fp32; keep_weight > 0 keeps every G_i at least keep_weight * A D A^T, so fp32
is enough). keep_weight = 0 can leave a row's Gram singular up to the ridge, where only fp64
keeps the ridge meaningful: dispatch sends it to the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_u_tile(w_ptr, a_ptr, b_ptr, keep_ptr, g_ptr, rows, cols, ranks, n_rows, n_cols, rank, scale,
                   stride_w, stride_a, stride_b, stride_keep):
    """(P * U * g) for a (rows x cols) tile, U = W + s*B@A built from a (rows x r) @ (r x cols) dot."""
    ok = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_b + ranks[None, :],
                mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank), other=0.0).to(tl.float32)
    a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :],
                mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols), other=0.0).to(tl.float32)
    u = w + scale * tl.dot(b, a, input_precision="ieee")
    keep = tl.load(keep_ptr + rows[:, None] * stride_keep + cols[None, :], mask=ok, other=1)
    g = tl.load(g_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    return tl.where(keep != 0, 0.0, u) * g[None, :], a


@triton.jit
def _pbs_rhs_kernel(out_ptr, w_ptr, a_ptr, b_ptr, keep_ptr, g_ptr, n_rows, n_cols, rank, scale, stride_w, stride_a,
                    stride_b, stride_keep, stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """out[i, :] = sum_j P_ij U_ij g_j A[:, j] for a block of rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        pug, a = _masked_u_tile(w_ptr, a_ptr, b_ptr, keep_ptr, g_ptr, rows, cols, ranks, n_rows, n_cols, rank,
                                scale, stride_w, stride_a, stride_b, stride_keep)
        acc += tl.dot(pug, tl.trans(a), input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * stride_out + ranks[None, :], acc,
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


@triton.jit
def _pick(vec, idx, k):
    """vec[k] of a 1-D register tensor (Triton has no scalar indexing into tensors)."""
    return tl.sum(tl.where(idx == k, vec, 0.0), axis=0)


@triton.jit
def _pbs_row_solve_kernel(out_ptr, w_ptr, a_ptr, b_ptr, prune_ptr, g_ptr, n_cols, rank, scale, keep_weight, ridge,
                          stride_w, stride_a, stride_b, stride_prune, stride_out,
                          BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dB[i] = -s (s^2 G_i + ridge I)^-1 sum_{j in S_i} g_j U_ij a_j for one row i per program."""
    i = tl.program_id(0)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    b = tl.load(b_ptr + i * stride_b + ranks, mask=rank_ok, other=0.0).to(tl.float32)
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    rhs = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        pruned = tl.load(prune_ptr + i * stride_prune + cols, mask=col_ok, other=0) != 0
        w = tl.load(w_ptr + i * stride_w + cols, mask=col_ok, other=0.0).to(tl.float32)
        u = w + scale * tl.sum(b[:, None] * a, axis=0)
        weight = g * tl.where(pruned, 1.0, keep_weight)
        gram += tl.dot(a * weight[None, :], tl.trans(a), input_precision="ieee")
        rhs += tl.sum(a * tl.where(pruned, u * g, 0.0)[None, :], axis=1)
    diag = ranks[:, None] == ranks[None, :]
    # padding ranks get a unit diagonal and a zero right-hand side: their solution is 0
    gram = scale * scale * gram + tl.where(diag, tl.where(rank_ok[:, None], ridge, 1.0), 0.0)
    rhs = -scale * rhs
    # Cholesky G = L L^T, one column per step
    low = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for k in range(0, BLOCK_R):
        col = tl.sum(tl.where(ranks[None, :] == k, gram, 0.0), axis=1)
        piv = tl.sqrt(_pick(col, ranks, k))
        l_k = tl.where(ranks >= k, col / piv, 0.0)
        gram -= l_k[:, None] * l_k[None, :]
        low += tl.where(ranks[None, :] == k, l_k[:, None], 0.0)
    # L y = rhs (forward), then L^T x = y (backward)
    y = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(0, BLOCK_R):
        l_k = tl.sum(tl.where(ranks[None, :] == k, low, 0.0), axis=1)
        y_k = _pick(rhs, ranks, k) / _pick(l_k, ranks, k)
        rhs -= l_k * y_k
        y += tl.where(ranks == k, y_k, 0.0)
    x = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t in range(0, BLOCK_R):
        k = BLOCK_R - 1 - t
        row_k = tl.sum(tl.where(ranks[:, None] == k, low, 0.0), axis=0)
        x_k = _pick(y, ranks, k) / _pick(row_k, ranks, k)
        y -= row_k * x_k
        x += tl.where(ranks == k, x_k, 0.0)
    tl.store(out_ptr + i * stride_out + ranks, x, mask=rank_ok)


def row_solve(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge, block_n=64) -> torch.Tensor:
    """dB (m, r) fp32 for keep_weight > 0, Grams and solves fused per row (r <= 64)."""
    W, A, B = (t.contiguous() for t in (W, A, B))
    prune = prune_mask.to(torch.int8).contiguous()
    m, n = W.shape
    r = A.shape[0]
    out = torch.empty((m, r), dtype=torch.float32, device=W.device)
    _pbs_row_solve_kernel[(m,)](out, W, A, B, prune, act_sq.float().contiguous(), n, r, float(scale),
                                float(keep_weight), float(ridge), W.stride(0), A.stride(0), B.stride(0),
                                prune.stride(0), out.stride(0), BLOCK_N=block_n, BLOCK_R=_block_r(r))
    return out


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def masked_rhs(W, A, B, scale, keep_mask, act_sq, block_m=32, block_n=64) -> torch.Tensor:
    """sum_j P_ij U_ij g_j A[:, j] per row, (m, r) fp32, without materializing U or P*U."""
    W, A, B = (t.contiguous() for t in (W, A, B))
    keep = keep_mask.to(torch.int8).contiguous()
    m, n = W.shape
    r = A.shape[0]
    out = torch.empty((m, r), dtype=torch.float32, device=W.device)
    _pbs_rhs_kernel[(triton.cdiv(m, block_m),)](out, W, A, B, keep, act_sq.float().contiguous(), m, n, r,
                                                float(scale), W.stride(0), A.stride(0), B.stride(0),
                                                keep.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                                BLOCK_R=_block_r(r))
    return out


def pbs_delta_keep1_triton(W, A, B, scale, keep_mask, act_sq, ridge) -> torch.Tensor:
    rhs = -scale * masked_rhs(W, A, B, scale, keep_mask, act_sq)
    A64, g = A.double(), act_sq.double()
    gram = scale * scale * (A64 * g) @ A64.T + ridge * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    return torch.linalg.solve(gram, rhs.double().T).T.float()


def pbs_delta_general_triton(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge) -> torch.Tensor:
    if not keep_weight > 0:
        raise ValueError("the fused PBS row solve needs keep_weight > 0 (keep_weight 0 is solved in fp64 by torch)")
    return row_solve(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge)
