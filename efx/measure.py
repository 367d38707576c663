"""Wall time and peak memory of a stage, measured the same way for every method.

Two memory figures: the peak resident set size (what the machine must have) and, with glibc,
the peak of the bytes the program holds from malloc (`mallinfo2`: allocated chunks plus mmapped
blocks). The RSS also counts free chunks the allocator keeps inside its heap, and how tightly a
run's tensors pack there changes from run to run; the bytes in use do not depend on that layout,
so they show what a change to the program itself costs.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from contextlib import contextmanager

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), else None."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def _mallinfo2():
    """glibc's mallinfo2 (2.33 and later), or None elsewhere."""
    function = getattr(glibc(), "mallinfo2", None)
    if function is None:
        return None
    function.restype = _MallInfo2
    function.argtypes = []
    return function


def heap_in_use_bytes() -> int | None:
    """Bytes held from malloc over every arena (allocated chunks + mmapped blocks); None
    without glibc."""
    function = _mallinfo2()
    if function is None:
        return None
    info = function()
    return info.uordblks + info.hblkhd


@contextmanager
def measure(record: dict, key: str, interval: float = 0.05):
    """Record `{key: {"seconds", "peak_rss_mb", "peak_heap_in_use_mb", "peak_cuda_mb"}}` for the
    body: wall time, the peaks seen by a sampling thread (every `interval` s, plus the start and
    the end) of the RSS and of the bytes in use from malloc (None without glibc), and, where CUDA
    is used, the peak of `torch.cuda.max_memory_allocated` over the body (None otherwise)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak = [rss_bytes(), heap_in_use_bytes()]
    stop = threading.Event()

    def sample():
        peak[0] = max(peak[0], rss_bytes())
        if peak[1] is not None:
            peak[1] = max(peak[1], heap_in_use_bytes())

    def run():
        while not stop.wait(interval):
            sample()

    thread = threading.Thread(target=run, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sample()
        if cuda:
            torch.cuda.synchronize()
        record[key] = {"seconds": time.perf_counter() - start, "peak_rss_mb": peak[0] / 2**20,
                       "peak_heap_in_use_mb": None if peak[1] is None else peak[1] / 2**20,
                       "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
