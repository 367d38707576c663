"""`SparseLoRALinear`: a drop-in linear layer whose frozen base weight is stored packed (2:4,
bitmap or masked dense) and whose LoRA adapter stays trainable; `to_sparse_lora` swaps every
target of a model in place, and `merge()` folds the adapter in without losing a single zero."""
from __future__ import annotations

import torch
from torch import nn

from efx.model.arch import architecture_map, base_linear, lora_parts, reset_lora
from efx_kernels import PackedWeight, effective_weight, pack, sparse_lora_linear
from efx_kernels.formats import FORMATS, fits_2_4

BUFFER_PREFIX = "packed_"


class SparseLoRALinear(nn.Module):
    """y = x @ W^T + scale * (dropout(x) @ A^T) @ B^T + bias with W packed and frozen.

    Args:
        packed: the compressed base weight (out_features x in_features).
        bias: optional bias (frozen, like the base).
        r: LoRA rank (0: no adapter).
        scale: LoRA scale (alpha / r for standard LoRA).
        dropout: dropout on the adapter input during training.
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, *, r: int = 8, scale: float = 2.0,
                 dropout: float = 0.0, lora_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.format = packed.format
        self._shape, self._dtype, self._version = packed.shape, packed.dtype, packed.version
        for key, tensor in packed.tensors.items():
            self.register_buffer(BUFFER_PREFIX + key, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.r, self.scale = r, float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, dtype = packed.device, lora_dtype or packed.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype)) if r else None
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype)) if r else None
        self.reset_adapter()
        self._packed_cache: PackedWeight | None = None

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_mask: torch.Tensor | None = None, *, format: str = "bitmap",
                    r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> "SparseLoRALinear":
        """Pack `linear.weight` under `keep_mask` (default: its nonzeros) and add a fresh adapter."""
        packed = pack(linear.weight.detach(), keep_mask, format)
        return cls(packed, linear.bias, r=r, scale=alpha / r if r else 0.0, dropout=dropout)

    @classmethod
    def from_lora_layer(cls, layer: nn.Module, keep_mask: torch.Tensor | None = None, *,
                        format: str = "bitmap") -> "SparseLoRALinear":
        """From a peft LoRA layer: its base weight packed, its adapter (A, B, scale, dropout) kept."""
        base = base_linear(layer)
        parts = lora_parts(layer)
        if parts is None:
            return cls.from_linear(base, keep_mask, format=format, r=0)
        A, B, scale = parts
        name = layer.active_adapters[0]
        drop = layer.lora_dropout[name]
        module = cls(pack(base.weight.detach(), keep_mask, format), base.bias, r=A.shape[0], scale=scale,
                     dropout=drop.p if isinstance(drop, nn.Dropout) else 0.0, lora_dtype=A.dtype)
        with torch.no_grad():
            module.lora_A.copy_(A)
            module.lora_B.copy_(B)
        return module

    # ---- the packed weight -------------------------------------------------------------
    @property
    def packed(self) -> PackedWeight:
        tensors = {name[len(BUFFER_PREFIX):]: buf for name, buf in self.named_buffers(recurse=False)
                   if name.startswith(BUFFER_PREFIX)}
        cached = self._packed_cache
        if cached is None or any(cached.tensors[k] is not v for k, v in tensors.items()):
            cached = self._packed_cache = PackedWeight(self.format, self._shape, self._dtype, tensors, self._version)
        return cached

    def _set_packed(self, packed: PackedWeight) -> None:
        for key, tensor in packed.tensors.items():
            setattr(self, BUFFER_PREFIX + key, tensor)
        self._packed_cache = None

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor, zeros where pruned."""
        return self.packed.unpack()

    def keep_mask(self) -> torch.Tensor:
        return self.packed.keep_mask()

    # ---- forward, adapter, merge -------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_in = self.dropout(x) if self.r else None
        return sparse_lora_linear(x, self.packed, self.lora_A, self.lora_B, self.scale, self.bias,
                                  lora_input=None if lora_in is x else lora_in)

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A Kaiming-uniform, B = 0 (the way peft initializes LoRA)."""
        if not self.r:
            return
        reset_lora(self.lora_A, self.lora_B, generator)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- M * (W + scale * B @ A), repacked with the same mask, then the adapter is reset:
        the merged layer is exactly as sparse as before."""
        if not self.r:
            return
        keep = self.keep_mask()
        merged = effective_weight(self.dense_weight(), self.lora_A, self.lora_B, self.scale)
        self._set_packed(pack(merged.mul_(keep).add_(0.0).to(self._dtype), keep, self.format))
        self.reset_adapter()

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dense-with-zeros weight (merge the adapter first)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.packed.device, dtype=self._dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        p = self.packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"r={self.r}, scale={self.scale}, bytes={p.nbytes} ({p.byte_ratio:.3f} of dense)")

    def config(self) -> dict:
        """What a loader needs besides the tensors."""
        return {"format": self.format, "shape": list(self._shape), "dtype": str(self._dtype).replace("torch.", ""),
                "version": self._version, "r": self.r, "scale": self.scale, "bias": self.bias is not None,
                "dropout": self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def packed_format(model: nn.Module) -> str:
    """"2:4" when the zeros of every target weight leave at most two nonzeros in each group of four
    columns (fewer bytes and a cheaper decode than bitmap), "bitmap" otherwise."""
    weights = (base_linear(module).weight for block in architecture_map(model).blocks
               for module in block.targets.values())
    return "2:4" if all(fits_2_4(w != 0) for w in weights) else "bitmap"


def to_sparse_lora(model: nn.Module, keep_masks: dict[str, torch.Tensor] | None = None, *, format: str = "bitmap",
                   rank: int | None = 8, alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Swap every target linear of `model` (plain or peft-wrapped) for a SparseLoRALinear, in place.

    keep_masks: qualified module name -> bool mask; by default the zeros already in the weights
    are the pruned positions. A peft LoRA layer keeps its adapter; a plain linear gets a fresh
    one of `rank` (0 or None: no adapter). Returns the model (now with only A and B trainable).
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: expected one of {FORMATS}")
    arch = architecture_map(model)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    swaps = []
    for block in arch.blocks:
        for role, module in block.targets.items():
            name = block.qualified(role)
            keep = None if keep_masks is None else keep_masks.get(name)
            if keep_masks is not None and keep is None:
                raise KeyError(f"keep_masks has no entry for {name}")
            if lora_parts(module) is not None:
                new = SparseLoRALinear.from_lora_layer(module, keep, format=format)
            else:
                new = SparseLoRALinear.from_linear(base_linear(module), keep, format=format, r=rank or 0,
                                                   alpha=alpha, dropout=dropout)
            swaps.append((name, new))
    for name, new in swaps:  # all packed before any swap: a bad mask leaves the model untouched
        parent, child = _parent(root, name)
        setattr(parent, child, new)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, SparseLoRALinear) and module.r:
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    return model


def merge_all(model: nn.Module) -> nn.Module:
    """Mask-preserving merge of every SparseLoRALinear adapter."""
    for module in model.modules():
        if isinstance(module, SparseLoRALinear):
            module.merge()
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Merge every adapter and replace every SparseLoRALinear by a dense-with-zeros nn.Linear."""
    merge_all(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLoRALinear):
            parent, child = _parent(model, name)
            setattr(parent, child, module.to_linear())
    return model
