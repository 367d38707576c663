"""Giving the C heap's free pages back to the operating system between pruning calls.

A pruning call keeps an undo copy of every weight it changes (about 425 MB for SmolLM2-135M's
targets) plus per-target temporaries, all served from glibc's main heap and freed when the call
ends. glibc keeps such freed chunks resident inside the heap; training then resumes on a heap
whose free space is laid out differently from before the call, and its next peak can land higher
(`benchmarks/overhead.py`). `release_free_memory` asks glibc (`malloc_trim(0)`) to return every
whole free page inside its heaps; the pages training reuses are faulted back in on first touch.
Elsewhere (no glibc) it does nothing.
"""
from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc, loaded once; None where the process does not run on glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None


def release_free_memory() -> bool:
    """Return the free pages of the C heap to the OS; True when glibc released any."""
    lib = libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False
