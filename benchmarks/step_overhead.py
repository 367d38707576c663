"""Paired, in-process cost of EfficientXpert inside training. Each round runs, after one untimed
step on its batch, one training step with the activation recorder inactive (its hooks detached:
a plain LoRA step) and one with it recording, on that batch (order alternated), then a pruning
call and the first step after it (recorder inactive, as in training). The calls cycle through
the three of the `efx run` default, each as the callback makes it: the first (its scores and
masks kept for the next), the last intermediate one (blends the first's scores, keeps only its
masks) and the final one (no PBS, no score memory, keeps nothing). A machine whose speed drifts
slows every mode of a round alike, which whole runs in separate processes (`overhead.py`)
cannot cancel.

    python benchmarks/step_overhead.py [--domain medical] [--rounds 18] [--output benchmarks/results]

Writes step_overhead.json: every step's and call's seconds; per mode the median step time and
the median over rounds of its step time / the plain LoRA step's of the same round; per kind of
call its median seconds, and their mean against one plain LoRA epoch; and, for the `efx run`
default (3 epochs: the three calls above, statistics recorded in the last `record_steps`
optimizer steps before each), the extra time of a whole run those medians add up to
(target: <= 5%).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

MODES = ("lora", "recording")
CALLS = ("first", "last_intermediate", "final")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="medical")
    parser.add_argument("--rounds", type=int, default=18)
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()

    import torch
    from transformers import set_seed

    from efx.method.recorder import ActivationRecorder
    from efx.data.suites import load_suite
    from efx.io import atomic_write_text
    from efx.model.loading import load_model
    from efx.method.prune import CARRIED, PruneMemory, prune
    from efx.evaluation.report import versions
    from efx.cli.run import RunSettings
    from efx.training import CompletionDataset, add_lora, completion_loss, pad_collate, training_subset

    settings = RunSettings(domain=args.domain, statistics="training")
    training, lora = settings.training(), settings.lora()
    if training.epochs != 3:  # checked before any step runs
        raise SystemExit(f"the calls modelled are those of a 3-epoch run; this run has {training.epochs}")
    set_seed(training.seed)
    model, tok = load_model()
    model = add_lora(model, lora, training.seed)
    suite = load_suite(args.domain)
    data = CompletionDataset(tok, training_subset(suite.train, training.n_examples, training.seed), suite.system,
                             training.max_length)
    collate = pad_collate(tok.pad_token_id)
    batches = [collate([data[i] for i in range(s, min(s + training.batch_size, len(data)))])
               for s in range(0, len(data), training.batch_size)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=training.learning_rate,
                                  weight_decay=training.weight_decay)
    recorder = ActivationRecorder(model)
    memory, config = PruneMemory(), settings.prune_config()
    call_args = {"first": (config, CARRIED), "last_intermediate": (config, ("masks",)),
                 "final": (replace(config, pbs=False, use_memory=False), ())}
    batch_cycle = itertools.cycle(batches)

    def step(batch) -> float:
        model.train()
        start = time.perf_counter()
        completion_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def run_mode(mode: str, batch) -> float:
        recorder.active = mode == "recording"
        return step(batch)

    run_mode("recording", next(batch_cycle))  # warm-up
    steps = {mode: [] for mode in (*MODES, "after_call")}
    calls = {kind: [] for kind in CALLS}
    for r in range(args.rounds):
        batch = next(batch_cycle)
        run_mode("lora", batch)  # untimed: the first step on a batch of a new shape is slower
        for mode in MODES[r % 2:] + MODES[:r % 2]:  # alternate the order between rounds
            steps[mode].append(run_mode(mode, batch))
        kind = CALLS[r % 3]
        start = time.perf_counter()
        prune(model, None, call_args[kind][0], memory=memory, recorded=recorder, carry=call_args[kind][1])
        calls[kind].append(time.perf_counter() - start)
        recorder.reset()
        steps["after_call"].append(run_mode("lora", batch))  # the first step after a call, as in training
    recorder.remove()

    median = {mode: statistics.median(v) for mode, v in steps.items()}
    ratio = {mode: statistics.median(a / b for a, b in zip(v, steps["lora"])) for mode, v in steps.items()}
    per_epoch = math.ceil(len(data) / training.batch_size)
    total, n_calls = per_epoch * training.epochs, len(CALLS)
    recorded = min(n_calls * settings.callback_record_steps, total)
    after_call = n_calls - 1  # the final call has no step after it
    call = {kind: statistics.median(v) for kind, v in calls.items()}
    mean_call = statistics.fmean(call.values())
    extra = (recorded * (ratio["recording"] - 1) + after_call * (ratio["after_call"] - 1)) * median["lora"] \
        + sum(call.values())
    result = {"benchmark": "step_overhead", "domain": args.domain, "rounds": args.rounds,
              "step_seconds": steps, "call_seconds": calls, "median_step_seconds": median,
              "step_ratio": ratio,
              "median_call_seconds": call, "mean_call_seconds": mean_call, "steps_per_epoch": per_epoch,
              "call_vs_lora_epoch": mean_call / (per_epoch * median["lora"]),
              "default_run": {"steps": total, "recorded_steps": recorded, "calls": n_calls,
                              "extra_time_ratio": extra / (total * median["lora"])},
              "command": f"python benchmarks/step_overhead.py --domain {args.domain} --rounds {args.rounds}",
              "versions": versions()}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "step_overhead.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("step_ratio", "median_call_seconds", "call_vs_lora_epoch",
                                             "default_run")}))


if __name__ == "__main__":
    main()
