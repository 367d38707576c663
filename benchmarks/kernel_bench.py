"""Kernel benchmarks: fused ForeSight scoring, activation statistics, batched PBS, and the
sparse+LoRA matmul against dense + unfused LoRA (what peft does), the bare sparse kernel, and
torch's semi-structured 2:4 path. On a GPU every time is a median of many runs with
`triton.testing.do_bench` (L2 flushed between runs) next to achieved GB/s and % of peak; on a
CPU only the torch paths are timed (the Triton interpreter is not a speed measurement).

    python benchmarks/kernel_bench.py [--output benchmarks/results] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import efx_kernels
from efx.io import atomic_write_text
from efx.evaluation.report import versions
from efx_kernels import pack
from efx_kernels.act_stats import accumulate_act_sq_reference
from efx_kernels.foresight import foresight_score_reference

PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
LLAMA3_8B = [(4096, 4096), (14336, 4096), (4096, 14336)]
EMBEDDED = [(576, 576), (1536, 576), (576, 1536)]
TOKENS = [1, 8, 16, 64, 256, 2048]
GPU_TOKENS = [1, 4, 16, 2048]  # decode and prefill, the token counts the targets are stated for
STATIC = Path(__file__).resolve().parent / "results" / "kernel_static_sm90.json"


def timer(fn) -> float:
    """Median milliseconds."""
    if torch.cuda.is_available():
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_bandwidth() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BYTES_PER_S.items() if k in name), None)


def bandwidth(nbytes: int, ms: float) -> dict:
    gbps = nbytes / (ms * 1e-3) / 1e9
    peak = peak_bandwidth()
    return {"ms": ms, "GB_per_s": gbps, "pct_of_peak": None if peak is None else 100 * gbps * 1e9 / peak}


def masks(m, n, sparsity, device, pattern="unstructured"):
    gen = torch.Generator(device="cpu").manual_seed(0)
    if pattern == "2:4":
        order = torch.rand(m, n // 4, 4, generator=gen).argsort(-1)[..., :2]
        keep = torch.zeros(m, n // 4, 4, dtype=torch.bool).scatter_(-1, order, True).reshape(m, n)
    else:
        keep = torch.rand(m, n, generator=gen) >= sparsity
    return keep.to(device)


def bench_pruning(device, dtype, shape=(4096, 14336), r=16) -> list[dict]:
    m, n = shape
    W = torch.randn(m, n, device=device, dtype=dtype) * 0.02
    A = torch.randn(r, n, device=device, dtype=dtype) * 0.01
    B = torch.randn(m, r, device=device, dtype=dtype) * 0.01
    stat = torch.rand(n, device=device)
    row = torch.rand(m, device=device)
    prev = torch.rand(m, n, device=device, dtype=torch.bfloat16)
    rows = []
    elt = W.element_size()
    for eta, prev_arg in ((1.0, None), (0.5, prev)):
        nbytes = m * n * (elt + 4) + (m * n * 2 if prev_arg is not None else 0)
        ms = timer(lambda: efx_kernels.foresight_score(W, A, B, 2.0, stat, row_factor=row, prev=prev_arg, eta=eta))
        ms_ref = timer(lambda: foresight_score_reference(W, A, B, 2.0, stat, row, None, prev_arg, eta))
        rows.append({"op": "foresight_score", "shape": [m, n], "r": r, "eta": eta,
                     **bandwidth(nbytes, ms), "reference_ms": ms_ref, "speedup_vs_reference": ms_ref / ms})
    ms = timer(lambda: efx_kernels.foresight_nm_keep_mask(W, A, B, 2.0, stat, 2, 4, row_factor=row))
    rows.append({"op": "foresight_nm_keep_mask_2:4", "shape": [m, n], "r": r, **bandwidth(m * n * (elt + 1), ms)})
    x = torch.randn(8 * 512, n, device=device, dtype=dtype)
    acc = torch.zeros(n, device=device)
    ms = timer(lambda: efx_kernels.accumulate_act_sq(x, acc))
    ms_ref = timer(lambda: accumulate_act_sq_reference(x, acc))
    rows.append({"op": "accumulate_act_sq", "shape": list(x.shape), **bandwidth(x.numel() * elt, ms),
                 "reference_ms": ms_ref})
    keep = masks(m, n, 0.5, device)
    g = stat + 0.1
    from efx.method.pbs import partial_brain_surgeon
    for kw in (1.0, 0.5):
        ms = timer(lambda: partial_brain_surgeon(W, A, B, keep, g, scale=2.0, keep_weight=kw))
        rows.append({"op": "pbs_layer", "shape": [m, n], "r": r, "keep_weight": kw, "ms": ms})
    return rows


def bench_matmul(device, dtype, shapes, tokens, r=16) -> list[dict]:
    rows = []
    for (m, n) in shapes:
        W = torch.randn(m, n, device=device, dtype=dtype) * 0.02
        A = torch.randn(r, n, device=device, dtype=dtype) * 0.01
        B = torch.randn(m, r, device=device, dtype=dtype) * 0.01
        packs = {}
        for name, fmt, sparsity, pattern in (("2:4", "2:4", 0.5, "2:4"), ("bitmap50", "bitmap", 0.5, "unstructured"),
                                             ("bitmap40", "bitmap", 0.4, "unstructured")):
            keep = masks(m, n, sparsity, device, pattern)
            packs[name] = pack(W * keep, keep, fmt)
        for M in tokens:
            x = torch.randn(M, n, device=device, dtype=dtype)
            dense_ms = timer(lambda: torch.nn.functional.linear(x, W) + 2.0 * ((x @ A.T) @ B.T))
            row = {"shape": [m, n], "tokens": M, "r": r, "dtype": str(dtype), "dense_plus_unfused_lora":
                   bandwidth(m * n * W.element_size(), dense_ms)}
            for name, packed in packs.items():
                fused = timer(lambda: efx_kernels.sparse_lora_linear(x, packed, A, B, 2.0))
                bare = timer(lambda: efx_kernels.sparse_lora_linear(x, packed, None, None, 0.0))
                row[name] = {**bandwidth(packed.nbytes, fused), "bare_sparse_ms": bare,
                             "lora_fusion_overhead": fused / bare - 1, "speedup_vs_dense": dense_ms / fused,
                             "byte_ratio": packed.byte_ratio}
            if device == "cuda" and M >= 64:
                try:
                    from torch.sparse import to_sparse_semi_structured
                    semi = to_sparse_semi_structured(packs["2:4"].unpack())
                    ms = timer(lambda: torch.nn.functional.linear(x, semi) + 2.0 * ((x @ A.T) @ B.T))
                    row["torch_semi_structured_2:4"] = {"ms": ms, "speedup_vs_dense": dense_ms / ms}
                except Exception as err:
                    row["torch_semi_structured_2:4"] = {"error": str(err)[:200]}
            rows.append(row)
            print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                      if kk in ("ms", "speedup_vs_dense")})
                              for k, v in row.items()}))
    return rows


def bench_configs(device, dtype, shape=(14336, 4096), tokens=(1, 16, 2048), r=16) -> list[dict]:
    """Every config the autotuner keeps, timed with its tiles fixed, beside the static check's
    record of the same config (registers, spills, instructions per weight) and the autotuned call."""
    from efx_kernels import sparse_lora as sl
    static = json.loads(STATIC.read_text())["records"] if STATIC.is_file() else []
    m, n = shape
    W = torch.randn(m, n, device=device, dtype=dtype) * 0.02
    A = torch.randn(r, n, device=device, dtype=dtype) * 0.01
    B = torch.randn(m, r, device=device, dtype=dtype) * 0.01
    rows = []
    for fmt, pattern in (("masked", "unstructured"), ("2:4", "2:4"), ("bitmap", "unstructured")):
        keep = masks(m, n, 0.5, device, pattern)
        packed = pack(W * keep, keep, fmt)
        for M in tokens:
            x = torch.randn(M, n, device=device, dtype=dtype)
            xa = 2.0 * (x @ A.T)
            tuned = timer(lambda: sl.fused_forward(x, packed, xa, B, None))
            kept = sl.prune_tile_configs(sl._tile_configs(), {"m_bucket": sl.m_bucket(M)}, FORMAT=sl.FORMAT_IDS[fmt])
            for config in kept:
                tiles = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                ms = timer(lambda: sl.fused_forward(x, packed, xa, B, None, tiles=tiles))
                record = next((s for s in static if s["kernel"] == "forward" and s["format"] == fmt
                               and s["tokens"] == M and s["rank"] == r and s["dtype"] == str(dtype).split(".")[-1]
                               and s["config"] == tiles), {})
                rows.append({"format": fmt, "tokens": M, "config": tiles, "ms": ms, "autotuned_ms": tuned,
                             **{k: record.get(k) for k in ("regs", "spill_bytes", "smem_bytes",
                                                            "instructions_per_weight")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and token counts")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    result = {"benchmark": "kernels", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "versions": versions(), "command": " ".join(["python"] + sys.argv)}
    if cuda:
        result["pruning"] = bench_pruning(device, dtype)
        shapes = LLAMA3_8B[:1] if args.quick else LLAMA3_8B
        result["matmul"] = bench_matmul(device, dtype, shapes, [1, 16, 2048] if args.quick else GPU_TOKENS)
        atomic_write_text(Path(args.output) / "kernels_gpu.json", json.dumps(result, indent=2))
        result["configs"] = bench_configs(device, dtype)
        name = "kernels_gpu.json"
    else:
        result["note"] = "CPU: torch paths only; GPU figures come from benchmarks/gpu_check.sh"
        result["matmul"] = bench_matmul(device, dtype, EMBEDDED, [1, 16, 256])
        name = "kernels_cpu.json"
    out = Path(args.output) / name
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
