"""Baseline pruning scores and solvers (method.md section 6): magnitude, Wanda and SparseGPT,
unstructured and N:M. The two pipelines that wrap them with LoRA live in efx.recipes."""
from __future__ import annotations

import torch

from efx.method.foresight import parse_pattern, select_keep_mask


def magnitude_score(U: torch.Tensor) -> torch.Tensor:
    """|U|."""
    return U.abs().float()


def wanda_score(U: torch.Tensor, act_sq: torch.Tensor, tokens: int) -> torch.Tensor:
    """Wanda: |U_ij| * ||X_j||_2 with ||X_j|| = sqrt(N_tokens * E[x_j^2])."""
    return U.abs().float() * (act_sq.float() * tokens).sqrt()[None, :]


@torch.no_grad()
def sparsegpt(W: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: str = "unstructured",
              block_size: int = 128, damp: float = 0.01, keep: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023): prune columns left to right in blocks, choosing the
    mask by w^2 / [H^-1]_jj^2 and spreading each pruned weight's error over the not yet visited
    columns through the Cholesky factor of H^-1.

    Args:
        W: (m, n) weight (not modified). hessian: (n, n) E[x x^T] (any positive scale).
        sparsity: fraction pruned per block of columns (unstructured); ignored for N:M.
        block_size: columns per lazy-update block (128). damp: dampening, fraction of mean diag(H).
        keep: a fixed keep-mask (bool, W's shape) instead of SparseGPT's own choice: only the
            reconstruction runs (the OBS update of the kept weights under that mask).
    Returns:
        (new weight in W's dtype with exact zeros, keep-mask bool).
    """
    nm = parse_pattern(pattern)
    W1 = W.float().clone()
    m, n = W1.shape
    H = hessian.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W1[:, dead] = 0.0
    H += damp * H.diagonal().mean() * torch.eye(n, device=H.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True).float()
    kept = torch.ones_like(W1, dtype=torch.bool)
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        block = W1[:, start:end].clone()
        h_block = h_inv[start:end, start:end]
        d = h_block.diagonal()
        errors = torch.zeros_like(block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if keep is not None:
            block_keep = keep[:, start:end]
        elif nm is None:
            block_keep = select_keep_mask(block.pow(2) / d.pow(2)[None, :], sparsity, granularity="matrix")
        for i in range(end - start):
            if keep is None and nm is not None and i % nm[1] == 0:
                group = block[:, i:i + nm[1]].pow(2) / d[i:i + nm[1]].pow(2)[None, :]
                block_keep[:, i:i + nm[1]] = select_keep_mask(group, 0.0, pattern)
            column = block[:, i]
            kept_column = torch.where(block_keep[:, i], column, torch.zeros_like(column))
            err = (column - kept_column) / d[i]
            block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            block[:, i] = kept_column
            errors[:, i] = err
        W1[:, start:end] = block
        kept[:, start:end] = block_keep
        W1[:, end:] -= errors @ h_inv[start:end, end:]
    W1[~kept] = 0.0
    return W1.to(W.dtype), kept
