"""Partial Brain Surgeon (method.md section 4): a closed-form update of the LoRA factor B under
a fixed mask, so that the adapter absorbs part of what pruning removes before the merge.

Per row i, with S_i the columns pruned in that row and K_i the rest:

    min_db  sum_{j in S_i} g_j (U_ij + s db.a_j)^2 + keep_weight sum_{j in K_i} g_j (s db.a_j)^2
            + ridge ||db||^2

All rows are solved together (no Python loop over rows).
"""
from __future__ import annotations

import torch

import efx_kernels


def _check(W, A, B, keep_mask, act_sq) -> None:
    m, n = W.shape
    if A.dim() != 2 or A.shape[1] != n:
        raise ValueError(f"A must be (r, {n}) for W of shape {tuple(W.shape)}, got {tuple(A.shape)}")
    if B.shape != (m, A.shape[0]):
        raise ValueError(f"B must be ({m}, {A.shape[0]}), got {tuple(B.shape)}")
    if keep_mask.shape != W.shape or keep_mask.dtype != torch.bool:
        raise ValueError(f"keep_mask must be a bool tensor of shape {tuple(W.shape)}, got "
                         f"{keep_mask.dtype} {tuple(keep_mask.shape)}")
    if act_sq.shape != (n,):
        raise ValueError(f"act_sq must have length in_features={n}, got shape {tuple(act_sq.shape)}")
    devices = {t.device for t in (W, A, B, keep_mask, act_sq)}
    if len(devices) > 1:
        raise ValueError(f"W, A, B, keep_mask and act_sq must be on one device, got {sorted(map(str, devices))}")
    for name, t in (("W", W), ("A", A), ("B", B), ("act_sq", act_sq)):
        if not all_finite(t):
            raise ValueError(f"{name} holds NaN or Inf")


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN or Inf, in one reduction where it can: a NaN or Inf makes the sum
    non-finite, and only a non-finite sum (which an overflow of finite values also gives) pays for
    the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _all_rows(mask: torch.Tensor) -> torch.Tensor:
    """Rows of a bool matrix that are all True (a byte-wise min is far faster than bool all on CPU)."""
    return mask.view(torch.uint8).amin(dim=1).bool()


def pruned_set(U: torch.Tensor, keep_mask: torch.Tensor, max_pruned_per_row: int | None) -> torch.Tensor:
    """S_i per row: the pruned columns, or only the `max_pruned_per_row` largest |U_ij| among them."""
    prune = ~keep_mask
    if max_pruned_per_row is None or max_pruned_per_row >= U.shape[1]:
        return prune
    magnitude = torch.where(prune, U.abs(), torch.full_like(U, -1.0))
    top = magnitude.topk(max_pruned_per_row, dim=1).indices
    limited = torch.zeros_like(prune)
    limited.scatter_(1, top, True)
    return limited & prune


def partial_brain_surgeon(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, keep_mask: torch.Tensor,
                          act_sq: torch.Tensor, *, scale: float = 1.0, keep_weight: float = 1.0,
                          ridge: float = 1e-8, max_pruned_per_row: int | None = None) -> torch.Tensor:
    """The updated LoRA factor B.

    Args:
        W: (m, n) frozen base weight.
        A: (r, n), B: (m, r) LoRA factors (A stays fixed).
        keep_mask: (m, n) bool, True = kept.
        act_sq: (n,) second moments g_j = E[x_j^2] of the module input.
        scale: LoRA scale s.
        keep_weight: weight of the kept coordinates' drift in the objective, in [0, 1] (1 = authors').
        ridge: Tikhonov term; makes rank-deficient systems solvable.
        max_pruned_per_row: restrict S_i to its c largest |U_ij| (K_i is then the complement of S_i).
    Returns:
        B + dB in B's dtype. fp16/bf16 inputs are computed in fp32 (the small solves in fp64).
        Rows with nothing pruned come back unchanged.
    """
    _check(W, A, B, keep_mask, act_sq)
    limited = max_pruned_per_row is not None and max_pruned_per_row < W.shape[1]
    prune = pruned_set(efx_kernels.effective_weight(W, A, B, scale), keep_mask, max_pruned_per_row) \
        if limited else None
    if keep_weight == 1.0:
        delta = efx_kernels.pbs_delta_keep1(W, A, B, scale, keep_mask if prune is None else ~prune, act_sq, ridge)
    else:
        prune = ~keep_mask if prune is None else prune
        delta = efx_kernels.pbs_delta_general(W, A, B, scale, prune, act_sq, keep_weight, ridge)
    # rows with nothing pruned: dB is exactly 0 in exact arithmetic; make it exactly 0 here too
    untouched = _all_rows(keep_mask) if prune is None else _all_rows(~prune)
    delta[untouched] = 0.0
    return (B.float() + delta).to(B.dtype)


def hessian_pbs(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, keep_mask: torch.Tensor, hessian: torch.Tensor,
                *, scale: float = 1.0, ridge: float = 1e-8) -> torch.Tensor:
    """The updated B minimizing the output error after masking under the full input second
    moment H = E[x x^T] (method.md, "Hessian PBS"): kept weights compensate pruned ones through
    input correlations, restricted to the adapter's row space."""
    n = W.shape[1]
    if hessian.shape != (n, n):
        raise ValueError(f"hessian must be ({n}, {n}), got {tuple(hessian.shape)}")
    _check(W, A, B, keep_mask, hessian.diagonal().contiguous())
    U = efx_kernels.effective_weight(W, A, B, scale)
    delta = efx_kernels.hessian_pbs_delta(U, keep_mask, A, hessian, scale, ridge)
    delta[_all_rows(keep_mask)] = 0.0
    return (B.float() + delta).to(B.dtype)
