"""Column second moments of activations, for ForeSight and Wanda statistics (and E[x x^T] for
SparseGPT and Hessian PBS).

Triton: one pass over x (tokens x n); each program owns a block of columns and a slice of the
tokens and writes a partial sum; the partials are then added in a fixed order, so the result does
not depend on scheduling (no atomics) and every rank of a data-parallel job computes
bit-identical statistics from identical inputs.
"""
from __future__ import annotations

import torch

from efx_kernels._triton import tl, triton
from efx_kernels.dispatch import use_triton


def accumulate_act_sq(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
    """acc (n,) fp32 += per-column sum of x**2 over tokens; x is (..., n) in fp32/bf16/fp16;
    `token_mask` (x's leading shape, nonzero = counted) excludes padding. Returns tokens counted."""
    if acc.dtype != torch.float32 or acc.shape != (x.shape[-1],):
        raise ValueError(f"acc must be fp32 of shape ({x.shape[-1]},), got {acc.dtype} {tuple(acc.shape)}")
    if token_mask is not None and token_mask.shape != x.shape[:-1]:
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} does not match x {tuple(x.shape[:-1])}")
    if use_triton(x, acc):
        return accumulate_act_sq_triton(x, acc, token_mask)
    return _accumulate_act_sq_torch(x, acc, token_mask)


def accumulate_hessian(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
    """acc (n, n) fp32 += x^T x over (non-padding) tokens; returns the tokens counted. A GEMM:
    torch's is already the fast path on every device."""
    n = x.shape[-1]
    if acc.dtype != torch.float32 or acc.shape != (n, n):
        raise ValueError(f"acc must be fp32 of shape ({n}, {n}), got {acc.dtype} {tuple(acc.shape)}")
    rows = token_rows(x, token_mask).float()
    acc += rows.T @ rows
    return rows.shape[0]


# ---- torch reference ------------------------------------------------------------------

def token_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x flattened to (tokens, n) with the padding tokens removed."""
    rows = x.reshape(-1, x.shape[-1])
    if token_mask is not None:
        rows = rows[token_mask.reshape(-1).to(torch.bool)]
    return rows


def accumulate_act_sq_reference(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
    """acc += sum over the counted tokens of x**2 (fp32); returns the tokens counted."""
    rows = token_rows(x, token_mask).float()
    acc += (rows * rows).sum(0)
    return rows.shape[0]


def _accumulate_act_sq_torch(x, acc, token_mask) -> int:
    """The reference, squaring in place where the rows are already a copy of x (padding removed,
    or converted to fp32), so no second (tokens, n) tensor is made."""
    rows = token_rows(x, token_mask).float()
    copied = rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    squares = rows.mul_(rows) if copied else rows * rows
    acc += squares.sum(0)
    return rows.shape[0]


# ---- Triton ---------------------------------------------------------------------------
@triton.jit
def _act_sq_partial_kernel(x_ptr, keep_ptr, part_ptr, n_tokens, n_cols, stride_x, tokens_per_split,
                           HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    col_block = tl.program_id(0)
    split = tl.program_id(1)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = split * tokens_per_split
    for start in range(0, tokens_per_split, BLOCK_T):
        rows = first + start + tl.arange(0, BLOCK_T)
        row_ok = (rows < n_tokens) & (start + tl.arange(0, BLOCK_T) < tokens_per_split)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(keep_ptr + rows, mask=row_ok, other=0)
            x = tl.where(keep[:, None] != 0, x, 0.0)  # padding may hold anything, even NaN
        acc += tl.sum(x * x, axis=0)
    tl.store(part_ptr + split * n_cols + cols, acc, mask=col_ok)


def accumulate_act_sq_triton(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None,
                             block_t: int = 32, block_n: int = 128) -> int:
    """acc += per-column sum of x**2 over (non-padding) tokens; returns the token count."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n_tokens, n_cols = rows.shape
    keep = None
    if token_mask is not None:
        keep = token_mask.reshape(-1).to(device=rows.device, dtype=torch.int8).contiguous()
    counted = n_tokens if keep is None else int(keep.sum())
    if n_tokens == 0:
        return 0
    col_blocks = triton.cdiv(n_cols, block_n)
    # enough programs to fill a GPU, each still streaming a long run of tokens
    splits = max(1, min(triton.cdiv(n_tokens, 4 * block_t), triton.cdiv(264, col_blocks)))
    per_split = triton.cdiv(triton.cdiv(n_tokens, splits), block_t) * block_t
    splits = triton.cdiv(n_tokens, per_split)
    partial = torch.empty((splits, n_cols), dtype=torch.float32, device=rows.device)
    _act_sq_partial_kernel[(col_blocks, splits)](rows, keep if keep is not None else rows, partial, n_tokens,
                                                 n_cols, rows.stride(0), per_split, HAS_MASK=keep is not None,
                                                 BLOCK_T=block_t, BLOCK_N=block_n)
    acc += partial.sum(0)
    return counted
