"""Where a training run's peak memory goes: bytes in use against the size of glibc's heap.

    python benchmarks/heap_probe.py [--steps 8] [--repeats 2] [--kinds lora efficientxpert-trainstats-all]
        [--malloc-env MALLOC_MMAP_THRESHOLD_=131072] [--output benchmarks/results]

Each run (its own process, alternating order) trains the overhead benchmark's model, data and
LoRA budget for --steps optimizer steps. At the LM head of every training forward (the end of the
forward: every activation is alive) it records the RSS, the main heap's size and the bytes of
free chunks inside it (glibc `malloc_info`), the mmapped bytes, and the process's peak RSS so
far. Bytes in use = heap size - free chunks + mmapped. glibc only (Linux). `--malloc-env` sets
glibc tunables in the children's environment, e.g. a fixed mmap threshold.
Writes heap_probe.json (or heap_probe_<tag>.json with --tag).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import KINDS, setup  # noqa: E402


@functools.cache
def _libc() -> ctypes.CDLL:
    from efx.measure import glibc

    libc = glibc()
    if libc is None:
        raise SystemExit("heap_probe needs glibc (Linux)")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    return libc


def heap_snapshot() -> dict:
    """RSS, main-heap size, free bytes inside it and mmapped bytes, in MB (glibc malloc_info)."""
    from efx.measure import rss_bytes

    libc = _libc()
    with tempfile.NamedTemporaryFile(suffix=".xml") as handle:
        stream = libc.fopen(handle.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        xml = Path(handle.name).read_text()
    main = re.search(r'<heap nr="0">(.*?)</heap>', xml, re.S).group(1)
    size = int(re.search(r'<system type="current" size="(\d+)"', main).group(1))
    free = int(re.search(r'<total type="rest" count="\d+" size="(\d+)"', main).group(1))
    mmapped = int(re.search(r'<total type="mmap" count="\d+" size="(\d+)"', xml.rsplit("</heap>", 1)[-1]).group(1))
    mb = 2 ** 20
    return {"rss_mb": rss_bytes() / mb, "heap_mb": size / mb, "heap_free_mb": free / mb, "mmap_mb": mmapped / mb,
            "in_use_mb": (size - free + mmapped) / mb,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(kind: str, steps: int) -> None:
    from efx.model.arch import unwrap
    from efx.training import train_lora

    settings, model, tok, suite, callbacks = setup(kind, "medical")
    snapshots = []  # the LM head is no LoRA target: train_lora's wrapping keeps this module and its hook
    unwrap(model).lm_head.register_forward_hook(
        lambda module, args, output: snapshots.append(heap_snapshot()) if module.training else None)
    training = settings.training()
    training.extra_args = {**training.extra_args, "max_steps": steps}
    train_lora(model, tok, suite.train, lora=settings.lora(), training=training, callbacks=callbacks,
               system=suite.system)
    print("RESULT " + json.dumps({"kind": kind, "steps": snapshots[:steps]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=["lora", "efficientxpert-trainstats-all"],
                        choices=["lora", *KINDS])
    parser.add_argument("--malloc-env", nargs="*", default=[], help="NAME=VALUE glibc tunables for the runs")
    parser.add_argument("--tag", default="")
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    from efx.io import atomic_write_text
    from efx.evaluation.report import versions

    env = dict(os.environ, **dict(item.split("=", 1) for item in args.malloc_env))
    runs = []
    for i in range(args.repeats):
        for kind in args.kinds if i % 2 == 0 else list(reversed(args.kinds)):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True, env=env).stdout
            runs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
            last = runs[-1]["steps"][-1]
            print(f"{kind}: peak RSS {last['max_rss_mb']:.0f} MB, "
                  f"most in use {max(s['in_use_mb'] for s in runs[-1]['steps']):.0f} MB")

    def summary(kind):
        mine = [r["steps"] for r in runs if r["kind"] == kind]
        return {"peak_rss_mb": statistics.median(s[-1]["max_rss_mb"] for s in mine),
                "in_use_at_loss_mb": statistics.median(max(x["in_use_mb"] for x in s) for s in mine),
                "heap_free_at_peak_use_mb": statistics.median(max(s, key=lambda x: x["in_use_mb"])["heap_free_mb"]
                                                              for s in mine)}

    result = {"benchmark": "heap_probe", "steps": args.steps, "malloc_env": args.malloc_env, "runs": runs,
              "kinds": {kind: summary(kind) for kind in args.kinds}, "versions": versions(),
              "command": " ".join(["python"] + sys.argv)}
    name = f"heap_probe_{args.tag}.json" if args.tag else "heap_probe.json"
    atomic_write_text(Path(args.output) / name, json.dumps(result, indent=2))
    print(json.dumps(result["kinds"]))


if __name__ == "__main__":
    main()
