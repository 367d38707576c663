"""Batched Partial Brain Surgeon kernels.

keep_weight = 1: one pass over W computes (P*U) D A^T with U = W + s*B@A formed on chip and
the mask applied on the fly (neither U nor P*U goes to memory); the single r x r system is
solved by torch.

General keep_weight: one pass per (row block, Gram row a) accumulates G_i[a, :] =
sum_{j in S_i} g_j A[a, j] A[:, j] for every row i with tensor-core dots, and the right-hand
sides likewise; the m small r x r systems are then solved by torch's batched solver.
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
def _pbs_gram_kernel(out_ptr, keep_ptr, a_ptr, g_ptr, n_rows, n_cols, rank, stride_keep, stride_a, stride_out_row,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[i, a, :] = sum_{j pruned in row i} g_j A[a, j] A[:, j] for a block of rows and one a."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    a_row = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        ok = (rows[:, None] < n_rows) & col_ok[None, :]
        keep = tl.load(keep_ptr + rows[:, None] * stride_keep + cols[None, :], mask=ok, other=1)
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        a_one = tl.load(a_ptr + a_row * stride_a + cols, mask=col_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :],
                    mask=(ranks[:, None] < rank) & col_ok[None, :], other=0.0).to(tl.float32)
        weighted = tl.where(keep != 0, 0.0, 1.0) * (g * a_one)[None, :]
        acc += tl.dot(weighted, tl.trans(a), input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * stride_out_row + a_row * rank + ranks[None, :], acc,
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


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


def pruned_grams(prune_mask, A, act_sq, block_m=32, block_n=64) -> torch.Tensor:
    """sum_{j in S_i} g_j a_j a_j^T per row, (m, r, r) fp32."""
    A = A.contiguous()
    keep = (~prune_mask).to(torch.int8).contiguous()
    m, n = keep.shape
    r = A.shape[0]
    out = torch.empty((m, r, r), dtype=torch.float32, device=A.device)
    _pbs_gram_kernel[(triton.cdiv(m, block_m), r)](out, keep, A, act_sq.float().contiguous(), m, n, r,
                                                   keep.stride(0), A.stride(0), out.stride(0), BLOCK_M=block_m,
                                                   BLOCK_N=block_n, BLOCK_R=_block_r(r))
    return out


def _solve(grams: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(grams, rhs[..., None])[..., 0].float()


def pbs_delta_keep1_triton(W, A, B, scale, keep_mask, act_sq, ridge) -> torch.Tensor:
    rhs = -scale * masked_rhs(W, A, B, scale, keep_mask, act_sq)
    A64, g = A.double(), act_sq.double()
    gram = scale * scale * (A64 * g) @ A64.T + ridge * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    return torch.linalg.solve(gram, rhs.double().T).T.float()


def pbs_delta_general_triton(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge) -> torch.Tensor:
    r = A.shape[0]
    rhs = -scale * masked_rhs(W, A, B, scale, ~prune_mask, act_sq)
    A64, g = A.double(), act_sq.double()
    full = (A64 * g) @ A64.T
    grams = keep_weight * full + (1.0 - keep_weight) * pruned_grams(prune_mask, A, act_sq).double()
    grams = scale * scale * grams + ridge * torch.eye(r, dtype=torch.float64, device=A.device)
    return _solve(grams, rhs.double())
