"""`sparse_lora_linear`: the public op over a packed base weight, with autograd, dispatched
between the fused Triton kernels, torch's semi-structured 2:4 path for prefill on GPUs that
have it, and the torch reference."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from efx_kernels.dispatch import use_triton
from efx_kernels.formats import PackedWeight

log = logging.getLogger(__name__)

PREFILL_TOKENS = 256  # from here on the 2:4 library path is tried on CUDA


class _FusedSparseLoRA(torch.autograd.Function):
    """Triton forward and dX; the LoRA gradients are (M x r)-sized GEMMs done by torch."""

    @staticmethod
    def forward(ctx, x2d, lora_in, A, B, bias, packed, scale):
        from efx_kernels import sparse_matmul
        fused = lora_in is x2d
        xa = None if A is None else scale * (lora_in @ A.T.to(lora_in.dtype))
        y = sparse_matmul.forward(x2d, packed, xa, None if B is None else B.to(x2d.dtype), bias)
        ctx.packed, ctx.scale, ctx.fused = packed, scale, fused
        ctx.save_for_backward(lora_in, A, B, xa)
        return y

    @staticmethod
    def backward(ctx, dy):
        from efx_kernels import sparse_matmul
        lora_in, A, B, xa = ctx.saved_tensors
        dy = dy.contiguous()
        dyb = None if B is None else ctx.scale * (dy @ B.to(dy.dtype))
        fused = ctx.fused and dyb is not None
        dx = sparse_matmul.grad_input(dy, ctx.packed, dyb if fused else None,
                                      A.to(dy.dtype) if fused else None) if ctx.needs_input_grad[0] else None
        d_lora_in = None
        if dyb is not None and not fused and ctx.needs_input_grad[1]:
            d_lora_in = dyb @ A.to(dy.dtype)
        dA = (dyb.T @ lora_in).to(A.dtype) if A is not None and ctx.needs_input_grad[2] else None
        dB = (dy.T @ xa).to(B.dtype) if B is not None and ctx.needs_input_grad[3] else None
        dbias = dy.sum(0) if ctx.needs_input_grad[4] else None
        return dx, d_lora_in, dA, dB, dbias, None, None


def _semi_structured(packed: PackedWeight):
    """torch's cuSPARSELt/CUTLASS 2:4 weight, built once per PackedWeight; None where unsupported."""
    if "semi" not in packed.cache:
        try:
            from torch.sparse import to_sparse_semi_structured
            packed.cache["semi"] = to_sparse_semi_structured(packed.unpack())
        except Exception as err:  # unsupported GPU, dtype or shape
            log.debug("semi-structured 2:4 unavailable: %s", err)
            packed.cache["semi"] = None
    return packed.cache["semi"]


def dense_of(packed: PackedWeight) -> torch.Tensor:
    """The dense weight, unpacked once per PackedWeight (the reference path's operand)."""
    if "dense" not in packed.cache:
        packed.cache["dense"] = packed.unpack()
    return packed.cache["dense"]


def sparse_lora_linear(x: torch.Tensor, packed: PackedWeight, A: torch.Tensor | None, B: torch.Tensor | None,
                       scale: float, bias: torch.Tensor | None = None, lora_input: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """y = x @ W^T + scale * (lora_input @ A^T) @ B^T + bias, W read from `packed`.

    x: (..., in) fp16/bf16 on the Triton path, any float dtype on the reference path;
    A (r, in), B (out, r) trainable; lora_input defaults to x (pass dropout(x) in training).
    Returns (..., out) in x's dtype.
    """
    n_in = packed.shape[1]
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {n_in}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, n_in)
    lora2d = x2d if lora_input is None else lora_input.reshape(-1, n_in)
    if use_triton(x2d, A, B):
        if packed.format == "2:4" and x2d.is_cuda and x2d.shape[0] >= PREFILL_TOKENS and not x2d.requires_grad:
            semi = _semi_structured(packed)
            if semi is not None:
                y = F.linear(x2d, semi, bias)
                if A is not None:
                    y = y + scale * ((lora2d @ A.T.to(x.dtype)) @ B.T.to(x.dtype))
                return y.reshape(*lead, -1)
        x2d = x2d.contiguous()
        lora2d = x2d if lora_input is None else lora2d.contiguous()
        y = _FusedSparseLoRA.apply(x2d, lora2d, A, B, bias, packed, float(scale))
        return y.reshape(*lead, -1)
    y = F.linear(x2d, dense_of(packed).to(x.dtype), None if bias is None else bias.to(x.dtype))
    if A is not None:
        y = y + scale * ((lora2d @ A.T.to(x.dtype)) @ B.T.to(x.dtype))
    return y.reshape(*lead, -1)
