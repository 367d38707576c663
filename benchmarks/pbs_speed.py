"""Batched PBS vs the per-row loop (the authors' formulation) on one layer, on this machine.

    python benchmarks/pbs_speed.py [--shape 1536 576] [--rank 8] [--output benchmarks/results]

Writes pbs_speed.json: median seconds of each path, the ratio, and the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_pbs import per_row_reference  # noqa: E402  (the loop lives with the tests)

from efx.io import atomic_write_text  # noqa: E402
from efx.method.pbs import partial_brain_surgeon  # noqa: E402
from efx.evaluation.report import versions  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    for _ in range(min(repeats, 10)):  # warm-up: allocator and caches settle
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[1536, 576], help="out_features in_features")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    os.environ.setdefault("EFX_KERNELS", "auto")
    m, n = args.shape
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=gen) * 0.02
    A = torch.randn(args.rank, n, generator=gen) / n**0.5
    B = torch.randn(m, args.rank, generator=gen) * 0.01
    g = torch.rand(n, generator=gen) + 0.1
    keep = torch.rand(m, n, generator=gen) >= args.sparsity
    rows = []
    for keep_weight in (1.0, 0.5):
        batched = median_seconds(lambda: partial_brain_surgeon(W, A, B, keep, g, scale=2.0, keep_weight=keep_weight,
                                                               ridge=1e-8), args.repeats)
        loop = median_seconds(lambda: per_row_reference(W, A, B, keep, g, 2.0, keep_weight, 1e-8,
                                                        dtype=torch.float32), 3)
        new_b = partial_brain_surgeon(W, A, B, keep, g, scale=2.0, keep_weight=keep_weight, ridge=1e-8)
        ref = per_row_reference(W, A, B, keep, g, 2.0, keep_weight, 1e-8)
        rows.append({"keep_weight": keep_weight, "batched_s": batched, "per_row_loop_s": loop,
                     "speedup": loop / batched, "max_abs_diff_vs_fp64_loop": float((new_b.double() - ref).abs().max())})
        print(f"keep_weight {keep_weight}: batched {batched * 1e3:.2f} ms, per-row loop {loop * 1e3:.1f} ms, "
              f"x{loop / batched:.0f}")
    result = {"benchmark": "pbs_speed", "shape": [m, n], "rank": args.rank, "sparsity": args.sparsity,
              "device": "cpu", "torch_threads": torch.get_num_threads(), "results": rows, "versions": versions(),
              # allocator settings change the cost of fresh buffers (page faults); recorded with the run
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
              "command": " ".join(["python"] + sys.argv)}
    out = Path(args.output) / "pbs_speed.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
