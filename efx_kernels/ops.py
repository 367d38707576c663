"""Public ops: each one checks its inputs, then runs the Triton kernel or the torch reference
as `dispatch.use_triton` decides."""
from __future__ import annotations

import torch

from efx_kernels import reference
from efx_kernels.dispatch import use_triton


def accumulate_act_sq(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
    """acc (n,) fp32 += per-column sum of x**2 over tokens; x is (..., n) in fp32/bf16/fp16;
    `token_mask` (x's leading shape, nonzero = counted) excludes padding. Returns tokens counted."""
    if acc.dtype != torch.float32 or acc.shape != (x.shape[-1],):
        raise ValueError(f"acc must be fp32 of shape ({x.shape[-1]},), got {acc.dtype} {tuple(acc.shape)}")
    if token_mask is not None and token_mask.shape != x.shape[:-1]:
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} does not match x {tuple(x.shape[:-1])}")
    if use_triton(x, acc):
        from efx_kernels.act_stats import accumulate_act_sq_triton
        return accumulate_act_sq_triton(x, acc, token_mask)
    return reference.accumulate_act_sq(x, acc, token_mask)


def accumulate_hessian(x: torch.Tensor, acc: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
    """acc (n, n) fp32 += x^T x over (non-padding) tokens. A GEMM: torch's is already the fast path."""
    n = x.shape[-1]
    if acc.dtype != torch.float32 or acc.shape != (n, n):
        raise ValueError(f"acc must be fp32 of shape ({n}, {n}), got {acc.dtype} {tuple(acc.shape)}")
    return reference.accumulate_hessian(x, acc, token_mask)


def foresight_score(W, A, B, scale, act_stat, *, row_factor=None, col_factor=None, prev=None, eta=1.0,
                    out_dtype=None) -> torch.Tensor:
    """eta * |W + scale*B@A| * act_stat * row_factor * col_factor + (1-eta) * prev, (m, n).

    W (m, n) any float dtype; A (r, n), B (m, r) or None; act_stat (n,); row_factor (m,);
    col_factor (n,) or (groups, n), group g covering rows [g*m/groups, (g+1)*m/groups);
    prev (m, n). fp32 math; result in `out_dtype` (fp32 by default).
    """
    m, n = W.shape
    if act_stat.shape != (n,):
        raise ValueError(f"act_stat must be ({n},), got {tuple(act_stat.shape)}")
    if row_factor is not None and row_factor.shape != (m,):
        raise ValueError(f"row_factor must be ({m},), got {tuple(row_factor.shape)}")
    if col_factor is not None and (col_factor.shape[-1] != n or (col_factor.dim() == 2 and m % col_factor.shape[0])):
        raise ValueError(f"col_factor must be ({n},) or (groups, {n}) with groups dividing {m}, "
                         f"got {tuple(col_factor.shape)}")
    if prev is not None and prev.shape != W.shape:
        raise ValueError(f"prev must match W's shape {tuple(W.shape)}, got {tuple(prev.shape)}")
    if use_triton(W, A, B, act_stat):
        from efx_kernels.foresight_score import foresight_score_triton
        return foresight_score_triton(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta, out_dtype)
    return reference.foresight_score(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta, out_dtype)


def nm_keep_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores in each row (ties: lower column kept)."""
    if score.shape[1] % m:
        raise ValueError(f"columns {score.shape[1]} not divisible by M={m}")
    return reference.nm_keep_mask(score, n, m)


def pbs_delta_keep1(U, keep_mask, A, act_sq, scale: float, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 for keep_weight = 1 (see reference.pbs_delta_keep1)."""
    if use_triton(U, A, act_sq):
        from efx_kernels.pbs import pbs_delta_keep1_triton
        return pbs_delta_keep1_triton(U, keep_mask, A, act_sq, scale, ridge)
    return reference.pbs_delta_keep1(U, keep_mask, A, act_sq, scale, ridge)


def pbs_delta_general(U, prune_mask, A, act_sq, scale: float, keep_weight: float, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 for any keep_weight (see reference.pbs_delta_general)."""
    if use_triton(U, A, act_sq) and A.shape[0] <= 64:
        from efx_kernels.pbs import pbs_delta_general_triton
        return pbs_delta_general_triton(U, prune_mask, A, act_sq, scale, keep_weight, ridge)
    return reference.pbs_delta_general(U, prune_mask, A, act_sq, scale, keep_weight, ridge)


def hessian_pbs_delta(U, keep_mask, A, H, scale: float, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 of Hessian PBS, in row blocks of batched GEMMs against H."""
    return reference.hessian_pbs_delta(U, keep_mask, A, H, scale, ridge)
