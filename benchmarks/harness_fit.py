"""The same suite tasks scored by `efx eval` and by lm-evaluation-harness, side by side.

    python benchmarks/harness_fit.py [--domain medical] [--items 100] [--model DIR] [--output benchmarks/results]

Exports the suite's test tasks with `efx suite export`'s code, scores them with efx's evaluation
and with `lm_eval.simple_evaluate` (model "hf", fp32, CPU) on the same model folder, and writes
harness_fit_<domain>.json: per task lm-eval's acc and acc_norm from both, efx's own
accuracy_norm (per token), the largest difference of a choice's log-likelihood, and the times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="medical")
    parser.add_argument("--items", type=int, default=100, help="first N test items of each task")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    from efx import load_model, load_suite
    from efx.evaluation.evaluate import choice_logprobs, evaluate
    from efx.evaluation.harness import export_suite
    from efx.evaluation.report import versions
    from efx.io import atomic_write_text

    model, tokenizer = load_model(args.model, dtype="float32")
    suite = load_suite(args.domain)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path(tmp) / "model"
        if not args.model:  # the embedded model is a GGUF file: lm-eval reads an HF folder
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        names = export_suite(suite, tokenizer, Path(tmp) / "tasks", max_items=args.items)
        started = time.perf_counter()
        ours = evaluate(model, tokenizer, suite, max_items=args.items, ppl=False)["tasks"]
        efx_seconds = time.perf_counter() - started
        started = time.perf_counter()
        theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                         tasks=names, task_manager=TaskManager(include_path=str(Path(tmp) / "tasks")),
                                         batch_size=16, device="cpu", log_samples=True)
        lm_eval_seconds = time.perf_counter() - started
    rows = {}
    for task, name in zip(suite.tasks, names):
        items = suite.tasks[task][:args.items]
        logliks = choice_logprobs(model, tokenizer, items, system=suite.system, harness=True)
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        gap = max(abs(r[0][0] - s[2]) for sample, scores in zip(samples, logliks)
                  for r, s in zip(sample["resps"], scores))
        rows[task] = {"items": len(items), "lm_eval_task": name,
                      "efx": {k: ours[task][k] for k in ("acc", "acc_norm", "accuracy", "accuracy_norm")},
                      "lm_eval": {"acc": theirs["results"][name]["acc,none"],
                                  "acc_norm": theirs["results"][name]["acc_norm,none"]},
                      "max_loglik_difference": gap}
        print(f"{task}: efx acc {rows[task]['efx']['acc']:.3f} acc_norm {rows[task]['efx']['acc_norm']:.3f} | "
              f"lm_eval acc {rows[task]['lm_eval']['acc']:.3f} acc_norm {rows[task]['lm_eval']['acc_norm']:.3f} | "
              f"efx accuracy_norm (per token) {rows[task]['efx']['accuracy_norm']:.3f} | max |d loglik| {gap:.2e}")
    result = {"benchmark": "harness_fit", "domain": args.domain, "model": args.model or "embedded", "tasks": rows,
              "seconds": {"efx_eval": efx_seconds, "lm_eval": lm_eval_seconds}, "versions": versions(),
              "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
              "command": " ".join(["python"] + sys.argv)}
    out = Path(args.output) / f"harness_fit_{args.domain}.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    print("written to", out)


if __name__ == "__main__":
    main()
