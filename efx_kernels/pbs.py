"""Batched Partial Brain Surgeon (method.md section 4): the update dB of the LoRA factor B under a
fixed mask, for all rows at once.

Per row i, with S_i the pruned columns, g = E[x^2] and U = W + s*B@A:

    (s^2 G_i + ridge I) db_i = -s sum_{j in S_i} g_j U_ij a_j,
    G_i = A diag(g_j (keep_weight + (1 - keep_weight) [j in S_i])) A^T.

Three paths per op: the torch reference (the formulas above in fp64, the truth the tests use), a
torch path for every device (row blocks, no m x n temporary, buffers held between calls on a
CPU) and the Triton kernels:
- keep_weight = 1: one pass over W computes (P*U) D A^T with U formed on chip and the mask
  applied on the fly; the single r x r system is solved by torch.
- 0 < keep_weight < 1: one program per row streams W[i], A and the mask once, accumulates its
  Gram and right-hand side, then factors s^2 G_i + ridge I by Cholesky and solves in registers
  (fp32: keep_weight > 0 keeps every G_i at least keep_weight * A D A^T). keep_weight = 0 can
  leave a row's Gram singular up to the ridge, where only fp64 keeps the ridge meaningful: it
  takes the torch path.
Precision of the dots (sm_90 figures from benchmarks/kernel_static.py, bf16):
- the right-hand-side kernel runs both its dots (the U tile's B @ A and (P*U*g) @ A^T) on tensor
  cores as 3xTF32 (input_precision "tf32x3": each fp32 operand is split into a tf32 high part and
  a tf32 remainder and three tf32 products are summed), about fp32 accuracy. As fp32 FMA dots it
  spilled 764 bytes at r = 64; plain tf32 would round U * g to 10 mantissa bits.
- the row solve's Gram A diag(w) A^T is an fp32 FMA dot (input_precision "ieee"): it does not
  spill at r = 64, and as 3xTF32 it took 1.8x the instructions (the kernel's time is the
  Cholesky in registers, not the Gram).
Hessian PBS (full H = E[x x^T]) is torch only: row blocks of batched GEMMs against H.
"""
from __future__ import annotations

import math
import threading

import torch

from efx_kernels._triton import block_for_rank, tl, triton
from efx_kernels.dispatch import use_triton
from efx_kernels.lora import effective_weight

MAX_FUSED_RANK = 64  # the fused row solve holds an r x r Gram in registers


def pbs_delta_keep1(W, A, B, scale: float, keep_mask, act_sq, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 of PBS with keep_weight = 1: -s ((P*U) D A^T)(s^2 A D A^T + ridge I)^-1.
    W (m, n), A (r, n), B (m, r), keep_mask (m, n) bool, act_sq (n,)."""
    if use_triton(W, A, B, act_sq):
        rhs = masked_rhs_triton(W, A, B, scale, keep_mask, act_sq)
    else:
        rhs, _ = _pruned_products(W, A, B, scale, keep_mask, True, act_sq, torch.float32)
    return _solve_shared_gram(A, act_sq, scale, ridge, rhs)


def pbs_delta_general(W, A, B, scale: float, prune_mask, act_sq, keep_weight: float, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 of PBS for any keep_weight in [0, 1]; `prune_mask` (m, n) bool is S_i per row."""
    if use_triton(W, A, B, act_sq) and A.shape[0] <= MAX_FUSED_RANK and keep_weight > 0:
        return row_solve_triton(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge)
    return _pbs_delta_general_torch(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge)


def hessian_pbs_delta(U, keep_mask, A, H, scale: float, ridge: float, block_rows: int = 64) -> torch.Tensor:
    """dB (m, r) fp32 minimizing ||s db (A * M_i) - P_i * U_i||_H^2 + ridge ||db||^2 per row:
    (s^2 At_i H At_i^T + ridge I) db = s At_i H (P_i * U_i)^T, At_i = A with pruned columns zeroed.
    Row blocks of batched GEMMs against H."""
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


def _solve_shared_gram(A, act_sq, scale: float, ridge: float, rhs: torch.Tensor) -> torch.Tensor:
    """dB = rhs (s^2 A D A^T + ridge I)^-1 for keep_weight 1, where every row shares one Gram.
    The r x r system is formed and solved in fp64 (it is tiny; fp32 would lose the ridge)."""
    A64, g = A.double(), act_sq.double()
    gram = scale * scale * (A64 * g) @ A64.T + ridge * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    return torch.linalg.solve(gram, rhs.double().T).T.float()


# ---- torch reference ------------------------------------------------------------------

def pbs_delta_reference(W, A, B, scale: float, prune_mask, act_sq, keep_weight: float, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 for any keep_weight, the formulas of the module docstring in fp64."""
    U = effective_weight(W, A, B, scale, torch.float64)
    A64, g = A.double(), act_sq.double()
    weights = g[None, :] * torch.where(prune_mask, 1.0, keep_weight).double()          # (m, n)
    grams = torch.einsum("in,an,bn->iab", weights, A64, A64)                            # (m, r, r)
    grams = scale * scale * grams + ridge * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    rhs = -scale * (torch.where(prune_mask, U, 0.0) * g[None, :]) @ A64.T              # (m, r)
    return torch.linalg.solve(grams, rhs[..., None])[..., 0].float()


def hessian_pbs_delta_reference(U, keep_mask, A, H, scale: float, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 of Hessian PBS, one row at a time in fp64."""
    A64, H64 = A.double(), H.double()
    eye = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    out = torch.zeros(U.shape[0], A.shape[0], device=U.device)
    for i in range(U.shape[0]):
        masked_a = A64 * keep_mask[i].double()                     # At_i
        pruned_u = U[i].double() * (~keep_mask[i]).double()        # P_i * U_i
        gram = scale * scale * masked_a @ H64 @ masked_a.T + ridge * eye
        out[i] = torch.linalg.solve(gram, scale * masked_a @ H64 @ pruned_u).float()
    return out


# ---- torch path: row blocks, buffers held on a CPU ------------------------------------
# Allocated fresh on every call, glibc hands multi-MiB buffers back to the OS when they are freed,
# and the next call pays one page fault per 4 KiB page (on a 1536 x 576 layer about 2 ms of a
# 2.4 ms call). On a CPU the rows are therefore walked in blocks of at most BLOCK_ELEMENTS, each
# through a buffer kept per (name, dtype) per thread until `release_buffers`. Other devices get
# fresh tensors and one block: CUDA's caching allocator already reuses memory.

BLOCK_ELEMENTS = 1 << 20
_held = threading.local()


def _row_block(m: int, n: int, device: torch.device) -> int:
    if torch.device(device).type != "cpu":
        return m
    return max(1, min(m, BLOCK_ELEMENTS // max(n, 1)))


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor of `shape`; on a CPU a view of a held buffer, so it must never
    outlive the caller's pass."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel > BLOCK_ELEMENTS:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _held.__dict__.setdefault("buffers", {})
    held = buffers.get((name, dtype))
    if held is None or held.numel() < numel:
        held = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return held[:numel].view(shape)


def release_buffers() -> None:
    """Drop this thread's held buffers (at most a few tens of MiB)."""
    _held.__dict__.pop("buffers", None)


def _pruned_products(W, A, B, scale: float, mask, mask_keeps: bool, act_sq, dtype: torch.dtype,
                     outer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """rhs = -s (P * U) D A^T, (m, r), and, when `outer` (n, k) is given, P @ outer, (m, k); P is
    the pruned set (`mask` is the kept set when `mask_keeps`). D is folded into the small A, so a
    block costs one fused multiply-add, one masking multiply and one GEMM (two with `outer`)."""
    m, n = W.shape
    device = W.device
    a = A.to(dtype)
    coeff = (a * act_sq.to(dtype)).T
    rhs = torch.empty(m, A.shape[0], dtype=dtype, device=device)
    products = None if outer is None else torch.empty(m, outer.shape[1], dtype=dtype, device=device)
    rows = _row_block(m, n, device)
    for start in range(0, m, rows):
        block = slice(start, min(start + rows, m))
        u = _buffer("u", (block.stop - start, n), dtype, device).copy_(W[block])
        u.addmm_(B[block].to(dtype), a, alpha=scale)
        pruned = mask[block]
        if mask_keeps:
            pruned = torch.logical_not(pruned, out=_buffer("pruned", tuple(pruned.shape), torch.bool, device))
        if outer is None:
            # a uint8 multiply streams; bool-indexed selects and masked_fill_ are several times slower on CPUs
            u.mul_(pruned.view(torch.uint8))
        else:
            p = _buffer("pruned_values", tuple(u.shape), dtype, device).copy_(pruned)
            u.mul_(p)
            torch.mm(p, outer, out=products[block])
        torch.mm(u, coeff, out=rhs[block])
    return rhs.mul_(-scale), products


def _pbs_delta_general_torch(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge) -> torch.Tensor:
    """All per-row Grams with one GEMM, vec(G_i) = keep_weight vec(A D A^T) + (1 - keep_weight)
    (P @ K)_i with K[j, (a, b)] = g_j A[a, j] A[b, j], then one batched fp64 solve (rank-deficient
    rows, fewer pruned columns than r, stay solvable through the ridge)."""
    # keep_weight > 0 bounds every Gram below by keep_weight * A D A^T: fp32 GEMMs suffice; at 0
    # a row's Gram can be singular and only fp64 keeps the ridge meaningful
    work = torch.float32 if keep_weight > 0 else torch.float64
    Aw, g = A.to(work), act_sq.to(work)
    r, n = A.shape
    outer = (g[:, None, None] * Aw.T[:, :, None] * Aw.T[:, None, :]).reshape(n, r * r)
    full = ((Aw * g) @ Aw.T).reshape(1, r * r)
    rhs, pruned_grams = _pruned_products(W, A, B, scale, prune_mask, False, act_sq, work, outer)
    grams = (keep_weight * full + (1.0 - keep_weight) * pruned_grams).reshape(-1, r, r).double()
    grams = scale * scale * grams + ridge * torch.eye(r, dtype=torch.float64, device=A.device)
    return torch.linalg.solve(grams, rhs.double()[..., None])[..., 0].float()


# ---- Triton ---------------------------------------------------------------------------
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
    u = w + scale * tl.dot(b, a, input_precision="tf32x3")
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
        acc += tl.dot(pug, tl.trans(a), input_precision="tf32x3")
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



def row_solve_columns(block_r: int) -> int:
    """Columns per step of the fused row solve: 64, and 16 from a rank side of 64 on, where the fp32
    dot of a 64-column step took 255 registers and spilled 516 bytes on sm_80 (16: 128 registers,
    no spill on sm_80 or sm_90; benchmarks/kernel_static.py)."""
    return 64 if block_r < 64 else 16


def row_solve_triton(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge) -> torch.Tensor:
    """dB (m, r) fp32 for 0 < keep_weight, Grams and solves fused per row (r <= MAX_FUSED_RANK)."""
    if not keep_weight > 0:
        raise ValueError("the fused PBS row solve needs keep_weight > 0 (keep_weight 0 is solved in fp64 by torch)")
    W, A, B = (t.contiguous() for t in (W, A, B))
    prune = prune_mask.to(torch.int8).contiguous()
    m, n = W.shape
    r = A.shape[0]
    block_r = block_for_rank(r)
    out = torch.empty((m, r), dtype=torch.float32, device=W.device)
    _pbs_row_solve_kernel[(m,)](out, W, A, B, prune, act_sq.float().contiguous(), n, r, float(scale),
                                float(keep_weight), float(ridge), W.stride(0), A.stride(0), B.stride(0),
                                prune.stride(0), out.stride(0), BLOCK_N=row_solve_columns(block_r), BLOCK_R=block_r)
    return out


def masked_rhs_triton(W, A, B, scale, keep_mask, act_sq, block_m=32, block_n=64) -> torch.Tensor:
    """rhs = -s sum_j P_ij U_ij g_j A[:, j] per row, (m, r) fp32, without materializing U or P*U."""
    W, A, B = (t.contiguous() for t in (W, A, B))
    keep = keep_mask.to(torch.int8).contiguous()
    m, n = W.shape
    r = A.shape[0]
    out = torch.empty((m, r), dtype=torch.float32, device=W.device)
    _pbs_rhs_kernel[(triton.cdiv(m, block_m),)](out, W, A, B, keep, act_sq.float().contiguous(), m, n, r,
                                                float(scale), W.stride(0), A.stride(0), B.stride(0),
                                                keep.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                                BLOCK_R=block_for_rank(r))
    return out.mul_(-scale)
