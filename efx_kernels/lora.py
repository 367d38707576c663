"""The LoRA-augmented weight that every pruning op starts from."""
from __future__ import annotations

import torch


def effective_weight(W: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, scale: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U = W + scale * B @ A as a new (m, n) tensor in `dtype` (W alone when there is no adapter).

    W (m, n), A (r, n), B (m, r), any float dtypes; the product is formed in `dtype`."""
    U = W.to(dtype, copy=True)  # the one m x n tensor made: the product is added in place
    if A is None or B is None or A.numel() == 0:
        return U
    return U.addmm_(B.to(dtype), A.to(dtype), alpha=scale)
