"""Pruning a model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): a call sees one
block's targets whole at a time.

`gathered(modules, registry)` all-gathers every sharded parameter of `modules` and swaps the full
tensor in for the duration; on a clean exit each rank writes its own shard of the new values back
into the sharded parameter, which FSDP then uses as before. Every rank computes the same full
tensors (statistics are all-reduced, the adapter's re-initialization is seeded identically), so
no rank sends another its result. `registry` maps each full tensor to its sharded parameter, so
that a failed call can restore the shards from its undo files (`write_back`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (FSDP2 or another sharding)."""
    return any(is_sharded(p) for p in model.parameters())


def on_every_rank(flag: bool) -> bool:
    """`flag` and the same on every other rank of the running job (one all-reduce; `flag` alone
    outside a distributed job), so that all ranks take the same branch."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def shard_like(full: torch.Tensor, sharded) -> torch.Tensor:
    """This rank's part of `full`, a tensor of `sharded`'s shape, as `sharded` places it."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.detach(), sharded.device_mesh, sharded.placements, src_data_rank=None).to_local()


def gather_like(local: torch.Tensor, sharded) -> torch.Tensor:
    """The full tensor whose parts the ranks hold as `sharded`'s shards are placed (a collective)."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local.to(sharded.to_local().device), sharded.device_mesh, sharded.placements,
                              shape=sharded.shape, stride=sharded.stride()).full_tensor()


@torch.no_grad()
def write_back(full: torch.Tensor, sharded) -> None:
    """This rank's part of `full` into the local shard of `sharded` (same placements)."""
    sharded.to_local().copy_(shard_like(full, sharded))


@contextmanager
def gathered(modules, registry: dict):
    """Inside: the sharded parameters of `modules` (not of their children's FSDP groups: each
    module's own and its submodules') are full tensors; afterwards the shards hold their values."""
    swaps = []
    for module in modules:
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and is_sharded(param):
                    full = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                    owner._parameters[name] = full
                    registry[id(full)] = param
                    swaps.append((owner, name, param, full))
    try:
        yield
    except BaseException:
        for owner, name, param, _ in swaps:
            owner._parameters[name] = param
        raise
    for owner, name, param, full in swaps:
        write_back(full, param)
        owner._parameters[name] = param
