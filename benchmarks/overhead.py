"""Overhead of EfficientXpert over plain LoRA training: the same model, data, budget and seed,
each run in its own process (so peak memory is not polluted by the other), alternating order.

    python benchmarks/overhead.py [--domain medical] [--repeats 2] [--kinds efficientxpert ...]
        [--output benchmarks/results]

Kinds: "efficientxpert" (each pruning call runs its calibration pass) and
"efficientxpert-trainstats" (statistics recorded during training, no extra forward).
Writes overhead.json: per run the training wall time and peak RSS, the pruning time of every
call, and per kind the ratios EfficientXpert / LoRA (targets: time <= 1.05, memory <= 1.01).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

KINDS = {"efficientxpert": "calibration", "efficientxpert-trainstats": "training"}  # kind -> statistics


def setup(kind: str, domain: str):
    """(settings, model, tokenizer, suite, callbacks) of one run of `kind` ("lora" or a KINDS key)."""
    from efx.callback import EfficientXpertCallback
    from efx.data import load_suite
    from efx.models import load_model
    from efx.pipelines import calibration_batches
    from efx.run import RunSettings

    settings = RunSettings(domain=domain)
    model, tok = load_model()
    suite = load_suite(domain)
    callbacks = []
    if kind != "lora":
        calib = calibration_batches(tok, suite.train, n=settings.calib, seed=settings.seed, system=suite.system)
        callbacks = [EfficientXpertCallback(calib, settings.prune_config(), statistics=KINDS[kind])]
    return settings, model, tok, suite, callbacks


def child(kind: str, domain: str) -> None:
    import resource

    from efx.measure import measure
    from efx.training import train_lora

    settings, model, tok, suite, callbacks = setup(kind, domain)
    calls = []
    record: dict = {}
    with measure(record, "train"):
        train_lora(model, tok, suite.train, lora=settings.lora(), training=settings.training(), callbacks=callbacks,
                   system=suite.system)
    if callbacks:
        calls = [{"when": c["when"], "seconds": c["seconds"]} for c in callbacks[0].reports]
    print("RESULT " + json.dumps({"kind": kind, **record["train"], "calls": calls,
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
    from efx.report import versions
    from efx.run import RunSettings
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

    def ratios(kind):
        calls = [c["seconds"] for r in runs if r["kind"] == kind for c in r["calls"]]
        return {"time_ratio": med(kind, "seconds") / med("lora", "seconds"),
                "memory_ratio": med(kind, "peak_rss_mb") / med("lora", "peak_rss_mb"),
                "process_memory_ratio": med(kind, "process_max_rss_mb") / med("lora", "process_max_rss_mb"),
                "pruning_seconds_per_call": statistics.median(calls), "train_seconds": med(kind, "seconds")}

    result = {"benchmark": "overhead", "domain": args.domain, "settings": RunSettings(domain=args.domain).__dict__,
              "runs": runs, "lora_train_seconds": med("lora", "seconds"),
              "kinds": {kind: ratios(kind) for kind in args.kinds}, "versions": versions(),
              "command": " ".join(["python"] + sys.argv)}
    atomic_write_text(Path(args.output) / "overhead.json", json.dumps(result, indent=2))
    print(json.dumps({"lora_train_seconds": result["lora_train_seconds"], **result["kinds"]}))


if __name__ == "__main__":
    main()
