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
        from efx_kernels.scoring import foresight_score_triton
        return foresight_score_triton(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta, out_dtype)
    return reference.foresight_score(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta, out_dtype)


def foresight_nm_keep_mask(W, A, B, scale, act_stat, n: int, m: int, *, row_factor=None, col_factor=None, prev=None,
                           eta=1.0) -> torch.Tensor:
    """N:M keep-mask (bool (rows, cols)) of the ForeSight score, fused: the score is never
    written. Same arguments as `foresight_score`."""
    if W.shape[1] % m:
        raise ValueError(f"columns {W.shape[1]} not divisible by M={m}")
    if use_triton(W, A, B, act_stat):
        from efx_kernels.scoring import nm_keep_mask_fused
        return nm_keep_mask_fused(W, A, B, scale, act_stat, n, m, row_factor, col_factor, prev, eta)
    score = foresight_score(W, A, B, scale, act_stat, row_factor=row_factor, col_factor=col_factor, prev=prev,
                            eta=eta)
    return reference.nm_keep_mask(score, n, m)


def nm_keep_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores in each row (ties: lower column kept)."""
    if score.shape[1] % m:
        raise ValueError(f"columns {score.shape[1]} not divisible by M={m}")
    return reference.nm_keep_mask(score, n, m)


def pbs_delta_keep1(W, A, B, scale: float, keep_mask, act_sq, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 of PBS with keep_weight = 1: -s ((P*U) D A^T)(s^2 A D A^T + ridge I)^-1,
    U = W + s*B@A. W (m, n), A (r, n), B (m, r), keep_mask (m, n) bool, act_sq (n,)."""
    if use_triton(W, A, B, act_sq):
        from efx_kernels.pbs import pbs_delta_keep1_triton
        return pbs_delta_keep1_triton(W, A, B, scale, keep_mask, act_sq, ridge)
    return reference.pbs_delta_keep1(W, A, B, scale, keep_mask, act_sq, ridge)


def pbs_delta_general(W, A, B, scale: float, prune_mask, act_sq, keep_weight: float, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 of PBS for any keep_weight; `prune_mask` (m, n) bool is S_i per row."""
    if use_triton(W, A, B, act_sq) and A.shape[0] <= 64 and keep_weight > 0:
        from efx_kernels.pbs import pbs_delta_general_triton
        return pbs_delta_general_triton(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge)
    return reference.pbs_delta_general(W, A, B, scale, prune_mask, act_sq, keep_weight, ridge)


def hessian_pbs_delta(U, keep_mask, A, H, scale: float, ridge: float) -> torch.Tensor:
    """dB (m, r) fp32 of Hessian PBS, in row blocks of batched GEMMs against H."""
    return reference.hessian_pbs_delta(U, keep_mask, A, H, scale, ridge)
