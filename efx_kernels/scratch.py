"""Scratch buffers for the torch reference kernels on the CPU, and the row blocks that bound them.

A PBS call on an (m, n) layer needs an fp32 copy of the merged weight and a mask of the same
shape. Allocated fresh on every call, glibc hands such multi-MiB buffers back to the OS when they
are freed, and the next call pays one page fault per 4 KiB page: on a 1536 x 576 layer that was
about 2 ms of a 2.4 ms call. The reference kernels therefore walk the rows in blocks of at most
`BLOCK_ELEMENTS` elements and keep one buffer per (name, dtype) per thread between calls, so the
memory held is bounded (4 MiB per fp32 buffer) whatever the layer size, and no full m x n
temporary is ever formed. Other devices get fresh tensors and one block: CUDA's caching
allocator already reuses memory, and small blocks would only add launches.
"""
from __future__ import annotations

import math
import threading

import torch

BLOCK_ELEMENTS = 1 << 20

_local = threading.local()


def row_block(m: int, n: int, device: torch.device) -> int:
    """Rows per block for an (m, n) pass on `device`."""
    if torch.device(device).type != "cpu":
        return m
    return max(1, min(m, BLOCK_ELEMENTS // max(n, 1)))


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor of `shape`. On the CPU it is a view of a buffer kept for the next
    call with the same name and dtype on this thread, so it must never outlive the caller's pass
    (never return it). Requests larger than `BLOCK_ELEMENTS` are not kept."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel > BLOCK_ELEMENTS:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _local.__dict__.setdefault("buffers", {})
    held = buffers.get((name, dtype))
    if held is None or held.numel() < numel:
        held = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return held[:numel].view(shape)


def release() -> None:
    """Drop this thread's held buffers (at most a few tens of MiB)."""
    _local.__dict__.pop("buffers", None)
