"""Architecture map: for each decoder block, the linears efx adapts and prunes, and the
facts ForeSight needs about who consumes whose output (heads, GQA groups, norms)."""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from efx_kernels import effective_weight

log = logging.getLogger(__name__)

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ROLE_PATHS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class BlockMap:
    """One decoder block.

    Attributes:
        index: block number.
        block: the block module.
        targets: role ("q", ..., "down", or a module path for generic models) -> linear
            module (a plain `nn.Linear` or a peft LoRA layer wrapping one).
        prefix: qualified name of the block inside the unwrapped model.
        post_attention_norm: the norm between o and gate/up, when known.
    """

    index: int
    block: nn.Module
    targets: dict[str, nn.Module]
    prefix: str
    post_attention_norm: nn.Module | None = None

    def qualified(self, role: str) -> str:
        return f"{self.prefix}.{ROLE_PATHS.get(role, role)}"


@dataclass
class ArchMap:
    """The whole decoder: family, attention geometry and blocks.

    `supported` is False for the generic fallback, where every `nn.Linear` inside the
    blocks is a target and no consumer (companion) relations are known.
    """

    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    blocks: list[BlockMap] = field(default_factory=list)
    supported: bool = True

    @property
    def group_size(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.blocks[0].targets) if self.blocks else ()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_linear(module: nn.Module) -> nn.Linear:
    """The frozen `nn.Linear` of a target (itself, or the base layer of a LoRA wrapper)."""
    inner = getattr(module, "base_layer", module)
    if not isinstance(inner, nn.Linear):
        raise TypeError(f"expected an nn.Linear or a LoRA layer wrapping one, got {type(module).__name__}")
    return inner


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the list of decoder blocks: `model.layers` for the supported families, else the
    first ModuleList whose length equals `config.num_hidden_layers`."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    for name, module in inner.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            return name, module
    raise ValueError(f"{type(inner).__name__} has no list of decoder blocks efx can find")


def architecture_map(model: nn.Module) -> ArchMap:
    """Map a decoder LM's blocks and targets. Works on plain and peft-wrapped models."""
    inner = unwrap(model)
    config = inner.config
    family = getattr(config, "model_type", "unknown")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    prefix, layers = decoder_layers(inner)
    arch = ArchMap(family, num_heads, num_kv_heads, head_dim, supported=family in SUPPORTED_FAMILIES)
    for index, block in enumerate(layers):
        block_prefix = f"{prefix}.{index}"
        if arch.supported:
            targets = {role: block.get_submodule(path) for role, path in ROLE_PATHS.items()}
            norm = getattr(block, "post_attention_layernorm", None)
        else:
            targets = {name: module for name, module in block.named_modules()
                       if isinstance(module, nn.Linear) and not _inside_lora(block, name)}
            norm = None
        arch.blocks.append(BlockMap(index, block, targets, block_prefix, norm))
    if not arch.supported:
        warnings.warn(
            f"model family {family!r} is not one of {SUPPORTED_FAMILIES}: every nn.Linear inside the "
            "decoder blocks is a target and ForeSight uses no propagation factors (generic fallback)",
            stacklevel=2)
    return arch


def _inside_lora(block: nn.Module, name: str) -> bool:
    """True for the adapter's own linears (lora_A/lora_B) and the base layer of a LoRA wrapper."""
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B", "base_layer", "lora_embedding_A", "lora_embedding_B") for p in parts)


def lora_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scale) of the active adapter of a peft LoRA layer, or None for a plain linear."""
    lora_a = getattr(module, "lora_A", None)
    if not lora_a:
        return None
    name = module.active_adapters[0]
    if name not in lora_a:
        return None
    return lora_a[name].weight, module.lora_B[name].weight, float(module.scaling[name])


@torch.no_grad()
def module_weight(module: nn.Module, scaled: bool = True) -> torch.Tensor:
    """U = W + s * B @ A of a target in fp32 (W alone for a plain linear). `scaled=False` drops s,
    as the authors' code does (the "paper" preset)."""
    parts = lora_parts(module)
    weight = base_linear(module).weight
    if parts is None:
        return effective_weight(weight, None, None, 0.0)
    a, b, scale = parts
    return effective_weight(weight, a, b, scale if scaled else 1.0)


@torch.no_grad()
def reset_lora(A: torch.Tensor, B: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Re-initialize an adapter the way peft does (A Kaiming-uniform, B = 0), drawing A in fp32
    from `generator` so that every rank of a distributed job draws the same A."""
    fresh = torch.empty(A.shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    A.copy_(fresh.to(A.dtype))
    B.zero_()
