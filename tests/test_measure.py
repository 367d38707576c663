"""Stage measurements: wall time, peak RSS and peak bytes in use from malloc."""
import time

import pytest
import torch

from efx.measure import heap_in_use_bytes, measure


def test_peaks_see_a_tensor_that_lived_inside_the_stage_only():
    if heap_in_use_bytes() is None:
        pytest.skip("no glibc mallinfo2 on this platform")
    size = 256 * 2**20
    slack = 4 * 2**20  # other objects of the process come and go meanwhile
    before = heap_in_use_bytes()
    record = {}
    with measure(record, "stage", interval=0.01):
        block = torch.ones(size // 4)  # fp32: `size` bytes, freed before the stage ends
        time.sleep(0.1)
        assert heap_in_use_bytes() - before >= size - slack
        del block
    m = record["stage"]
    assert m["seconds"] >= 0.1
    assert m["peak_heap_in_use_mb"] >= (before + size - slack) / 2**20
    assert heap_in_use_bytes() < before + size - slack  # gone again after the stage, the peak kept it
    assert m["peak_rss_mb"] >= size / 2**20
