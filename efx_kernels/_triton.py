"""Triton where it is installed, else a stand-in under the same names.

Every op file defines its kernels beside its torch reference. Without Triton (a macOS or
Windows machine, say) those files still import; only launching a kernel fails, and dispatch
never launches one there.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    import triton.testing  # noqa: F401  (the autotuner's timer)
except ImportError:
    triton = tl = None

if triton is None:
    from types import SimpleNamespace

    class _Unlaunchable:
        """What `triton.jit` and `triton.autotune` give without Triton."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError("Triton is not installed: efx_kernels runs its torch references")

    triton = SimpleNamespace(jit=_Unlaunchable, autotune=lambda **kwargs: _Unlaunchable,
                             Config=lambda *args, **kwargs: None, cdiv=lambda a, b: -(-a // b),
                             next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length())
    tl = SimpleNamespace(constexpr=None)


def block_for_rank(rank: int) -> int:
    """The LoRA-rank side of a kernel tile: a power of two, at least 16 (the smallest tl.dot side)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))
