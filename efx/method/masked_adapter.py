"""Masked adapter between pruning calls (method.md section 5, efx option).

After a pruning call the base weight is sparse, but a plain LoRA delta `s * B @ A` is dense:
training moves the pruned coordinates again and the next call has to cut them off with no
training left to recover. With the masked adapter each target computes

    y = x @ W^T + dropout(x) @ (M * (s * B @ A))^T

so the effective weight `M * (W + s * B @ A)` keeps the mask while training, and the final
merge loses nothing. Costs: one byte (a bool) per weight for the masks, and per target and step
about three dense GEMMs more than plain LoRA (the masked delta is formed, used and
differentiated at full size; it is recomputed in backward rather than kept).
"""
from __future__ import annotations

import torch

from efx.model.arch import ArchMap, base_linear, lora_parts
from efx_kernels import effective_weight
from efx.method.score_memory import unpack_mask


class _MaskedDelta(torch.autograd.Function):
    """x @ (mask * (scale * B @ A))^T with gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, A, B, mask, scale):
        ctx.save_for_backward(x, A, B, mask)
        ctx.scale = scale
        delta = (B @ A).mul_(scale).mul_(mask)
        return x @ delta.T

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, mask = ctx.saved_tensors
        s = ctx.scale
        grad_x = grad_a = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            delta = (B @ A).mul_(s).mul_(mask)
            grad_x = grad_out @ delta
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_delta = (g2.T @ x.reshape(-1, x.shape[-1])).mul_(mask)  # dL/d(delta), masked
            if ctx.needs_input_grad[1]:
                grad_a = (B.T @ g_delta).mul_(s)
            if ctx.needs_input_grad[2]:
                grad_b = (g_delta @ A.T).mul_(s)
        return grad_x, grad_a, grad_b, None, None


def masked_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """`x @ (mask * (scale * B @ A))^T` (mask bool, shape of the weight), differentiable in x, A, B."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    return _MaskedDelta.apply(x, A, B, mask, float(scale))


def _masked_forward(module, mask: torch.Tensor):
    name = module.active_adapters[0]

    def forward(x, *args, **kwargs):
        result = module.base_layer(x, *args, **kwargs)
        if module.disable_adapters or module.merged:
            return result
        A, B, scale = lora_parts(module)
        dropped = module.lora_dropout[name](x).to(A.dtype)
        return result + masked_delta(dropped, A, B, mask, scale).to(result.dtype)

    return forward


def attach(arch: ArchMap, masks) -> int:
    """Mask the adapter delta of every LoRA target named in `masks` (a mapping with `get`, such
    as `PruneMemory.masks`, of bit-packed keep-masks). Returns the number of targets masked."""
    count = 0
    for block in arch.blocks:
        for role, module in block.targets.items():
            packed = masks.get(block.qualified(role))
            if packed is None or lora_parts(module) is None:
                continue
            weight = base_linear(module).weight
            mask = unpack_mask(packed, weight.shape).to(weight.device)  # bool: one byte per weight
            module.forward = _masked_forward(module, mask)  # instance attribute: shadows the class forward
            module._efx_mask = mask
            count += 1
    return count


@torch.no_grad()
def fold(arch: ArchMap) -> None:
    """Move the masked delta into the base weight (`W <- W + M * (s * B @ A)`, B <- 0) and restore
    the plain LoRA forward. The model computes the same function before and after (up to
    dropout), so a pruning call can then score `W + s * B @ A` as usual."""
    for block in arch.blocks:
        for module in block.targets.values():
            mask = getattr(module, "_efx_mask", None)
            if mask is None:
                continue
            A, B, scale = lora_parts(module)
            weight = base_linear(module).weight
            # W + M * (s B A): the LoRA-augmented weight where the mask keeps, W elsewhere
            folded = torch.where(mask, effective_weight(weight, A, B, scale), weight.float())
            weight.copy_(folded.to(weight.dtype))
            B.zero_()
            del module.forward
            del module._efx_mask
