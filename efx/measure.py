"""Wall time and peak resident memory of a stage, measured the same way for every method."""
from __future__ import annotations

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


@contextmanager
def measure(record: dict, key: str, interval: float = 0.05):
    """Record `{key: {"seconds", "peak_rss_mb"}}` for the body: wall time, and the peak RSS seen
    by a sampling thread (every `interval` s, plus the start and the end)."""
    peak = [rss_bytes()]
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        record[key] = {"seconds": time.perf_counter() - start, "peak_rss_mb": peak[0] / 2**20}
