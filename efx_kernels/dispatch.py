"""Where every efx_kernels op decides between its Triton kernel and the torch reference.

`EFX_KERNELS=auto` (default): Triton for CUDA tensors when Triton imports, torch otherwise.
`EFX_KERNELS=triton`: always Triton (with TRITON_INTERPRET=1 this runs the kernels on CPU
tensors, which is how CI checks them). `EFX_KERNELS=torch`: always the reference.
"""
from __future__ import annotations

import functools
import os

import torch

MODES = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports (it is optional: efx works without it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any import-time failure means "not usable here"
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mode() -> str:
    value = os.environ.get("EFX_KERNELS", "auto").lower()
    if value not in MODES:
        raise ValueError(f"EFX_KERNELS={value!r}: expected one of {MODES}")
    return value


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on these tensors runs its Triton kernel."""
    chosen = mode()
    if chosen == "torch":
        return False
    if chosen == "triton":
        if not triton_available():
            raise RuntimeError("EFX_KERNELS=triton but Triton cannot be imported")
        on_cuda = all(t.is_cuda for t in tensors if t is not None)
        if not on_cuda and not interpreting():
            raise RuntimeError("EFX_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return triton_available() and all(t is not None and t.is_cuda for t in tensors if t is not None) \
        and any(t is not None for t in tensors)
