"""Overhead of EfficientXpert over plain LoRA training: the same model, data, budget and seed,
each run in its own process (so peak memory is not polluted by the other), alternating order.

    python benchmarks/overhead.py [--domain medical] [--repeats 2] [--kinds efficientxpert ...]
        [--output benchmarks/results]

Kinds: "efficientxpert" (each pruning call runs its calibration pass) and
"efficientxpert-trainstats" (statistics recorded during training, no extra forward, in the last
optimizer steps before each call: the `efx run` default).
Writes overhead.json: per run the training wall time, every epoch's wall time (without the
pruning call at its start), the peak RSS and the peak bytes in use from malloc (`efx.measure`),
the pruning time of every call; per kind the ratios EfficientXpert / LoRA of the whole run's
time, peak RSS and peak bytes in use, and one pruning call against one plain LoRA epoch
(targets: <= 5% extra time, <= 1% extra memory).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# kind -> statistics
KINDS = {"efficientxpert": "calibration", "efficientxpert-trainstats": "training"}


def setup(kind: str, domain: str):
    """(settings, model, tokenizer, suite, callbacks) of one run of `kind` ("lora" or a KINDS key)."""
    from efx.method.schedule import EfficientXpertCallback
    from efx.data.suites import load_suite
    from efx.model.loading import load_model
    from efx.recipes import calibration_batches
    from efx.cli.run import RunSettings

    statistics = KINDS.get(kind, "calibration")
    settings = RunSettings(domain=domain, statistics=statistics)
    model, tok = load_model()
    suite = load_suite(domain)
    callbacks = []
    if kind != "lora":
        calib = calibration_batches(tok, suite.train, n=settings.calib, seed=settings.seed, system=suite.system)
        callbacks = [EfficientXpertCallback(calib, settings.prune_config(), statistics=statistics)]
    return settings, model, tok, suite, callbacks


def epoch_timer():
    """A TrainerCallback that appends every epoch's wall time to its `seconds`; placed after the
    EfficientXpert callback, it starts timing once the pruning call at an epoch's start is done."""
    import time

    from transformers import TrainerCallback

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._start = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def child(kind: str, domain: str) -> None:
    import resource

    from efx.measure import measure
    from efx.training import train_lora

    settings, model, tok, suite, callbacks = setup(kind, domain)
    timer = epoch_timer()
    calls = []
    record: dict = {}
    with measure(record, "train"):
        train_lora(model, tok, suite.train, lora=settings.lora(), training=settings.training(),
                   callbacks=[*callbacks, timer], system=suite.system)
    if callbacks:
        calls = [{"when": c["when"], "seconds": c["seconds"]} for c in callbacks[0].reports]
    record_steps = callbacks[0].record_steps if callbacks else None
    print("RESULT " + json.dumps({"kind": kind, **record["train"], "epoch_seconds": timer.seconds, "calls": calls,
                                  "record_steps": record_steps,
                                  "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="medical")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.domain)
        return
    from efx.io import atomic_write_text
    from efx.evaluation.report import versions
    from efx.cli.run import RunSettings
    runs = []
    for i in range(args.repeats):
        order = ["lora", *args.kinds]
        for kind in order if i % 2 == 0 else reversed(order):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--domain", args.domain],
                                 capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
            print(runs[-1])

    def med(kind, field):
        return statistics.median(r[field] for r in runs if r["kind"] == kind)

    def epoch(kind):
        return statistics.median(e for r in runs if r["kind"] == kind for e in r["epoch_seconds"])

    def ratios(kind):
        call = statistics.median(c["seconds"] for r in runs if r["kind"] == kind for c in r["calls"])
        return {"time_ratio": med(kind, "seconds") / med("lora", "seconds"),
                "call_vs_lora_epoch": call / epoch("lora"),
                "epoch_ratio": epoch(kind) / epoch("lora"),
                "epoch_with_call_ratio": (epoch(kind) + call) / epoch("lora"),
                "memory_ratio": med(kind, "peak_rss_mb") / med("lora", "peak_rss_mb"),
                "heap_in_use_ratio": med(kind, "peak_heap_in_use_mb") / med("lora", "peak_heap_in_use_mb"),
                "process_memory_ratio": med(kind, "process_max_rss_mb") / med("lora", "process_max_rss_mb"),
                "pruning_seconds_per_call": call, "train_seconds": med(kind, "seconds"),
                "epoch_seconds": epoch(kind)}

    result = {"benchmark": "overhead", "domain": args.domain, "settings": RunSettings(domain=args.domain).__dict__,
              "runs": runs, "lora_train_seconds": med("lora", "seconds"), "lora_epoch_seconds": epoch("lora"),
              "kinds": {kind: ratios(kind) for kind in args.kinds}, "versions": versions(),
              "command": " ".join(["python"] + sys.argv)}
    atomic_write_text(Path(args.output) / "overhead.json", json.dumps(result, indent=2))
    print(json.dumps({"lora_train_seconds": result["lora_train_seconds"], **result["kinds"]}))


if __name__ == "__main__":
    main()
