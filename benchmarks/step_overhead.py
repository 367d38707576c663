"""Paired, in-process cost of EfficientXpert inside training. Each round runs, after one untimed
step on its batch, one training step without the activation recorder, one with it attached but
idle and one with it recording, on that batch (order rotated), then a pruning call and the first step after it (idle, as in
training). A machine whose speed drifts slows every mode of a round alike, which whole runs in
separate processes (`overhead.py`) cannot cancel.

    python benchmarks/step_overhead.py [--domain medical] [--rounds 18] [--output benchmarks/results]

Writes step_overhead.json: every step's and call's seconds; per mode the median step time and
the median over rounds of its step time / the plain LoRA step's of the same round; the median
call against one plain LoRA epoch; and, for the `efx run` default (3 calls, statistics recorded
in the last `record_steps` optimizer steps before each), the extra time of a whole run those
medians add up to (target: <= 5%).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

MODES = ("lora", "idle", "recording")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="medical")
    parser.add_argument("--rounds", type=int, default=18)
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()

    import torch
    from transformers import set_seed

    from efx.activation_recorder import ActivationRecorder
    from efx.data import load_suite
    from efx.io import atomic_write_text
    from efx.models import load_model
    from efx.prune import PruneMemory, prune
    from efx.report import versions
    from efx.run import RunSettings
    from efx.training import CompletionDataset, add_lora, completion_loss, pad_collate, training_subset

    settings = RunSettings(domain=args.domain, statistics="training")
    training, lora = settings.training(), settings.lora()
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
    batch_cycle = itertools.cycle(batches)

    def step(batch) -> float:
        model.train()
        start = time.perf_counter()
        completion_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def run_mode(mode: str, batch) -> float:
        nonlocal recorder
        if mode == "lora":
            recorder.remove()
        recorder.active = mode == "recording"
        try:
            return step(batch)
        finally:
            if mode == "lora":  # attached again outside the timed step, keeping what it recorded
                sums, recorder = recorder.sums, ActivationRecorder(model)
                recorder.sums = sums

    run_mode("recording", next(batch_cycle))  # warm-up
    steps = {mode: [] for mode in (*MODES, "after_call")}
    calls = []
    for r in range(args.rounds):
        batch = next(batch_cycle)
        run_mode("idle", batch)  # untimed: the first step on a batch of a new shape is slower
        for mode in MODES[r % 3:] + MODES[:r % 3]:  # rotate the order between rounds
            steps[mode].append(run_mode(mode, batch))
        start = time.perf_counter()
        prune(model, None, config, memory=memory, recorded=recorder)
        calls.append(time.perf_counter() - start)
        recorder.reset()
        steps["after_call"].append(run_mode("idle", batch))  # the first step after a call, as in training
    recorder.remove()

    median = {mode: statistics.median(v) for mode, v in steps.items()}
    ratio = {mode: statistics.median(a / b for a, b in zip(v, steps["lora"])) for mode, v in steps.items()}
    per_epoch = math.ceil(len(data) / training.batch_size)
    total, n_calls = per_epoch * training.epochs, training.epochs
    recorded = min(n_calls * settings.callback_record_steps, total)
    after_call = n_calls - 1  # the final call has no step after it
    call = statistics.median(calls)
    extra = (recorded * (ratio["recording"] - 1) + after_call * (ratio["after_call"] - 1)
             + (total - recorded - after_call) * (ratio["idle"] - 1)) * median["lora"] + n_calls * call
    result = {"benchmark": "step_overhead", "domain": args.domain, "rounds": args.rounds,
              "step_seconds": steps, "call_seconds": calls, "median_step_seconds": median,
              "step_ratio": ratio,
              "median_call_seconds": call, "steps_per_epoch": per_epoch,
              "call_vs_lora_epoch": call / (per_epoch * median["lora"]),
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
