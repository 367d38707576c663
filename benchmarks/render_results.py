"""docs/results.md from the result files in benchmarks/results/: every measured figure the README
points to, each table with the file and the command it came from.

    python benchmarks/render_results.py          # rewrite docs/results.md
    python benchmarks/render_results.py --check  # exit 1 when docs/results.md is stale
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = ROOT / "docs" / "results.md"


def _module(name: str):
    """A benchmark script of this folder, whose tables or arithmetic this page reuses."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _versions(v: dict) -> str:
    return f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, {v['machine']}"


def _version_counts(results: dict) -> str:
    """The library versions of a folder's rows, with how many rows ran each where they differ."""
    counts = Counter(_versions(row["versions"]) for row in results.values())
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n} rows)" for v, n in sorted(counts.items()))


def retention_section() -> list[str]:
    results = _load("domain_retention.json")
    bench = _module("domain_retention")
    dense = bench.dense_references(results)
    first = next(iter(results.values()))
    lines = ["## Retention on the embedded model, suite v2", "",
             "File `benchmarks/results/domain_retention.json`, measured on suite v2, whose test sets still held "
             "near-duplicates of training texts. Every row holds its command; the per-seed tables "
             "with raw accuracy and measured sparsity are in `domain_retention.md`. Versions: "
             f"{_versions(first['versions'])}. Budget: 3 epochs x 160 examples, batch 8, lr 1e-3, r 8, alpha 16.", "",
             "Scores are length-normalized accuracy; retention is the mean over a domain's tasks of method score / "
             "dense-LoRA score, with perplexity as dense / method, each seed against the dense LoRA of that seed. "
             "Two seeds of one row differ by up to 0.08, so differences below about 0.03 are noise.", "",
             "### Base model and dense LoRA (seed 0, test split)", "",
             "| domain | task | base | dense LoRA | majority |", "| --- | --- | --- | --- | --- |"]
    for (domain, seed), ref in sorted(dense.items()):
        if seed:
            continue
        for task, scores in ref["eval"]["tasks"].items():
            base = ref["base_eval"]["tasks"][task]
            lines.append(f"| {domain} | {task} | {base['accuracy_norm']:.3f} | {scores['accuracy_norm']:.3f} | "
                         f"{scores['majority_baseline']:.3f} |")
        lines.append(f"| {domain} | perplexity | {ref['base_eval']['perplexity']['perplexity']:.2f} | "
                     f"{ref['eval']['perplexity']['perplexity']:.2f} | |")
    lines += ["", "### Retention by method", "",
              "Methods: `efficientxpert-efx` is the epoch schedule with the efx preset and calibration statistics; "
              "`-trainstats-last4` records the statistics in the last 4 optimizer steps before each call (the "
              "`efx run` default when these rows ran; its default recipe is the ramp of the v3 grid below); "
              "`-masked` masked adapter; `-obs` OBS update of the kept weights; `-early` a call before the first "
              "step plus the masked adapter; `-reset` optimizer state cleared after each call; `-hessian` Hessian "
              "PBS; `-matrix` per-matrix selection; `paper` the authors' code; `foresight` no PBS; "
              "`X/prune-lora-reprune` and `X/lora-prune` the baseline pipelines.", ""]
    return lines + [line.replace("### ", "#### ") for line in bench.summary(results)]


RAMP = ("`efx-run-default` is what `efx run` does with its defaults (the settings are in each row): the base "
        "pruned on a cubic ramp over the first two thirds of training (calls every sixth of it) with one adapter "
        "trained throughout, a calibration pass per call, and the kept weights rebuilt under the ForeSight mask at "
        "every call (`PruneConfig.reconstruct`); at 2:4 the ramp is one cut of the base to 2:4 at its first call, "
        "where the rebuild's OBS solve also chooses each group's two keeps (SparseGPT's rule on W + s*B@A), then "
        "the adapter trains on it. `efficientxpert-efx-ramp-rebuild` is that cut with ForeSight's 2:4 mask "
        "rebuilt (the default until commit 5db1445); `efficientxpert-efx-ramp` is the ramp on statistics recorded "
        "during training, without the rebuild (`efx run --statistics training`).")


def retention_grid_section(folder: str, title: str, budget: str) -> list[str]:
    """A grid on suite v3 (leak-checked test items, 800 per task): seed means, spreads and the
    paired intervals against the best baseline."""
    path = RESULTS / folder / "domain_retention.json"
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    bench = _module("domain_retention")
    first = next(iter(results.values()))
    lines = [f"## {title}", "",
             f"File `benchmarks/results/{folder}/domain_retention.json`: the test items of suite v3 (no test prompt "
             f"a near-duplicate of a training text), {first.get('n_test', 300)} items per task or the whole test "
             f"pool; {budget}. Versions: {_version_counts(results)}. {RAMP}", ""]
    lines += [line.replace("### ", "#### ") for line in bench.summary(results)]
    paired = bench.paired(results)
    if paired:
        lines += ["### Paired against the best baseline", "",
                  "Task retention (perplexity left out), paired bootstrap over the test items, pooled over the seeds "
                  "both methods ran.", ""] + [line.replace("### ", "#### ") for line in paired]
    return lines


def retention_v3_section() -> list[str]:
    return retention_grid_section("v3", "Retention on suite v3", "the same budget as above (60 optimizer steps)")


def retention_4x_section() -> list[str]:
    return retention_grid_section("v3-4x", "Retention on suite v3, four times the training examples",
                                  "3 epochs x 640 examples (240 optimizer steps), otherwise the budget above")


def pbs_section() -> list[str]:
    d = _load("pbs_speed.json")
    m, n = d["shape"]
    lines = ["## Batched PBS against the per-row loop", "",
             f"File `benchmarks/results/pbs_speed.json`, command `{d['command']}`; {m} x {n}, r {d['rank']}, "
             f"sparsity {d['sparsity']}, {d['device']}, {d['torch_threads']} threads. Targets: x50 (keep_weight 1), "
             "x20 (0.5).", "", "| keep_weight | batched (ms) | per-row loop (ms) | speed-up | max abs diff vs fp64 loop |",
             "| --- | --- | --- | --- | --- |"]
    for r in d["results"]:
        lines.append(f"| {r['keep_weight']} | {1e3 * r['batched_s']:.2f} | {1e3 * r['per_row_loop_s']:.1f} | "
                     f"x{r['speedup']:.0f} | {r['max_abs_diff_vs_fp64_loop']:.1e} |")
    return lines + [""]


def overhead_section() -> list[str]:
    lines = ["## Overhead of pruning inside training", "",
             "`efx run`'s default (statistics recorded in the last 4 optimizer steps before each call) against "
             "plain LoRA on the same budget, medical, five runs of each per batch, the same pruning code in every "
             "batch. Whole runs on this shared 2-core machine spread by 5-15% between runs of LoRA alone, so the "
             "paired measure below settles the time target.", "",
             "| file | whole run x LoRA | one call / LoRA epoch | peak RSS x LoRA | bytes in use x LoRA |",
             "| --- | --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("overhead_recorded_5runs_*.json")):
        k = json.loads(path.read_text())["kinds"]["efficientxpert-trainstats"]
        lines.append(f"| `{path.name}` | x{k['time_ratio']:.3f} | {k['call_vs_lora_epoch']:.3f} | "
                     f"x{k['memory_ratio']:.3f} | x{k['heap_in_use_ratio']:.3f} |")
    lines += ["", "Command: `python benchmarks/overhead.py --repeats 5 --kinds efficientxpert-trainstats`.", "",
              "Paired measure (`python benchmarks/step_overhead.py`): LoRA steps without hooks, with the recording "
              "hooks and the first step after a call, interleaved on the same batches, and the three calls of a "
              "default run.", "",
              "| file | recording step x plain | step after a call x plain | median calls (s) | call / LoRA epoch "
              "| default run, extra time |", "| --- | --- | --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("step_overhead*.json")):
        d = json.loads(path.read_text())
        calls = " / ".join(f"{v:.2f}" for v in d["median_call_seconds"].values())
        lines.append(f"| `{path.name}` | x{d['step_ratio']['recording']:.3f} | x{d['step_ratio']['after_call']:.3f} | "
                     f"{calls} | {d['call_vs_lora_epoch']:.3f} | +{100 * d['default_run']['extra_time_ratio']:.1f}% |")
    return lines + [""]


def formats_section() -> list[str]:
    d = _load("kernels_cpu.json")
    lines = ["## Packed formats", "",
             f"File `benchmarks/results/kernels_cpu.json`, command `{d['command']}`. Compressed bytes / dense bytes "
             "of the packed weight (the bound on decode speed-up is its inverse). The file's CPU timings are the "
             "torch reference path, not the kernels; no GPU has run the kernels yet.", "",
             "| shape | 2:4 | bitmap 50% | bitmap 40% |", "| --- | --- | --- | --- |"]
    seen = set()
    for row in d["matmul"]:
        shape = tuple(row["shape"])
        if shape in seen:
            continue
        seen.add(shape)
        lines.append(f"| {shape[0]} x {shape[1]} | {row['2:4']['byte_ratio']:.3f} | "
                     f"{row['bitmap50']['byte_ratio']:.3f} | {row['bitmap40']['byte_ratio']:.3f} |")
    return lines + [""]


def scale_section() -> list[str]:
    path = RESULTS / "scale_cpu.json"
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    rebuild_path = RESULTS / "scale_cpu_rebuild.json"
    rebuild = json.loads(rebuild_path.read_text()) if rebuild_path.is_file() else None
    rebuild_calls = [dict(r, case=r["case"] + " rebuild") for r in (rebuild or {"rows": []})["rows"]
                     if r["case"].startswith("call:") and "error" not in r]
    lines = ["## Scale: Llama-family models of real layer shapes", "",
             f"File `benchmarks/results/scale_cpu.json`, command `{d['command']}`; {d['dtype']}, random weights "
             f"built at run time, calibration {d['calibration'][0]} x {d['calibration'][1]} tokens, LoRA r 16, "
             "EfficientXpert 40% (ForeSight + PBS: the call of the efx preset's epoch schedule; `efx run`'s default "
             "also rebuilds the kept weights, the rows marked `rebuild`, from `benchmarks/results/scale_cpu_rebuild.json`"
             f"{', command `' + rebuild['command'] + '`' if rebuild else ''}). Extra peak: over what the process held "
             "before the call (RSS; bytes in use from malloc). The plan behind these figures is [memory.md](memory.md).",
             "",
             "| case | layers | target MB (one layer) | call s | extra peak RSS MB | extra peak in use MB |",
             "| --- | --- | --- | --- | --- | --- |"]
    calls = [r for r in d["rows"] if r["case"].startswith("call:") and "error" not in r]
    for r in calls + rebuild_calls:
        lines.append(f"| {r['case']} | {r['layers']} | {r['target_mb']:.0f} ({r['layer_target_mb']:.0f}) | "
                     f"{r['call_seconds']:.1f} | {r['extra_peak_rss_mb']:.0f} | "
                     f"{r.get('extra_peak_heap_in_use_mb', float('nan')):.0f} |")
    for r in (r for r in d["rows"] if r["case"].startswith("run:") and "error" not in r):
        era = "" if "reconstruct" in r else ", measured before the rebuild became the default"
        lines += ["", f"`efx run` on `{r['case']}` (a user JSONL domain, 2 epochs x 8 examples{era}): wall "
                      f"{r['wall_seconds']:.0f} s, peak RSS over the process before {r['peak_mb']:.0f} MB = "
                      f"{r['peak_over_model']:.2f} x the model's {r['model_mb']:.0f} MB; audited sparsity "
                      f"{r['sparsity']:.4f}, {r['negative_zeros']} negative zeros, saved as {', '.join(r['saved_dtypes'])}."]
    for r in (r for r in d["rows"] if "error" in r):
        lines += ["", f"`{r['case']}` failed: see the file."]
    ext = _module("scale").extrapolate([r for r in d["rows"] if "error" not in r])
    if "growth_2_to_6_per_layer_over_layer_bytes" in ext:
        growth = ", ".join(f"{v:+.3f} ({k.replace('extra_peak_', '').replace('_mb', '').replace('_', ' ')})"
                           for k, v in ext["growth_2_to_6_per_layer_over_layer_bytes"].items())
        lines += ["", "Growth of a call's extra peak per added layer, 2 -> 6 layers, as a fraction of one layer's "
                      f"target bytes: {growth} (bar: <= 0.25)."]
    if "plan_gb" in ext:
        measured = [r["extra_peak_rss_mb"] for r in calls + rebuild_calls if r["case"].startswith("call:llama3-8b")]
        plan = _module("scale").memory_plan(call_extra_mb=max(measured, default=None))
        lines += ["", "Predicted peak of a 32-layer Llama-3-8B `efx run` in bf16 on one GPU: " +
                  " + ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in plan.items() if k != "total") +
                  f" = **{plan['total']:.1f} GB** of an H200's 141 GB. Not yet measured on a GPU."]
    return lines + [""]


def static_section() -> list[str]:
    path = RESULTS / "kernel_static_sm90.json"
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    lines = ["## Kernels compiled for an H200 (sm_90), statically", "",
             f"File `benchmarks/results/kernel_static_sm90.json`, command `{d['command']}`, triton {d['triton']}; "
             "compiled without a GPU. Fused forward at bf16, LoRA r 16, Llama-3-8B gate/up shape, the launch "
             "specialized for 16 tokens; `kept`: the autotuner would try the config for decode (M <= 16) or prefill "
             "(M = 2048). Instructions per weight: SASS instructions of the main loop per weight element it "
             "consumes, per thread; `x masked`: that figure over the masked (dense-with-zeros) format's at the same "
             "tile. A static proxy, not a speed.", "",
             "| format | BLOCK_M x BLOCK_ROWS, warps | kept (decode / prefill) | regs | spill B | smem KB | "
             "instr / weight | x masked |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    forward = [r for r in d["records"] if r["kernel"] == "forward" and r["dtype"] == "bfloat16" and r["rank"] == 16
               and "error" not in r]
    kept = {}
    for r in forward:
        key = (r["format"], r["config"]["BLOCK_M"], r["config"]["BLOCK_ROWS"], r["config"]["num_warps"])
        kept.setdefault(key, {})[r["tokens"]] = r["kept"]
    masked = {(r["config"]["BLOCK_M"], r["config"]["BLOCK_ROWS"], r["config"]["num_warps"]): r
              for r in forward if r["format"] == "masked" and r["tokens"] == 16}
    for r in forward:
        if r["tokens"] != 16:
            continue
        c = r["config"]
        key = (r["format"], c["BLOCK_M"], c["BLOCK_ROWS"], c["num_warps"])
        flags = "yes" if kept[key].get(16) else "no", "yes" if kept[key].get(2048) else "no"
        base = masked.get(key[1:])
        ratio = f"{r['instructions_per_weight'] / base['instructions_per_weight']:.2f}" if base else "-"
        lines.append(f"| {r['format']} | {c['BLOCK_M']} x {c['BLOCK_ROWS']}, {c['num_warps']} | {flags[0]} / {flags[1]} | "
                     f"{r['regs']} | {r['spill_bytes']} | {r['smem_bytes'] / 1024:.0f} | "
                     f"{r['instructions_per_weight']:.1f} | {ratio} |")
    bad = [r for r in d["records"] if r.get("kept") and (r.get("error") or r.get("spill_bytes") or not r["smem_ok"])]
    lines += ["", f"{len(d['records'])} compiled cases; kept configs that spill, overflow shared memory or fail to "
                  f"compile: {len(bad)}."]
    return lines + [""]


def harness_section() -> list[str]:
    paths = sorted(RESULTS.glob("harness_fit_*.json"))
    if not paths:
        return []
    lines = ["## The same items scored by `efx eval` and by lm-evaluation-harness", "",
             "lm-eval's `acc` (largest log-likelihood) and `acc_norm` (per character of the choice) from efx's "
             "evaluation and from `lm_eval.simple_evaluate` (model `hf`, fp32) on the tasks `efx suite export` "
             "writes; efx's own `accuracy_norm` (per token) beside them. Max |d loglik|: the largest difference "
             "of one choice's log-likelihood between the two.", "",
             "| domain | task | items | efx acc | lm_eval acc | efx acc_norm | lm_eval acc_norm | "
             "efx accuracy_norm (per token) | max \\|d loglik\\| |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in paths:
        d = json.loads(path.read_text())
        for task, r in d["tasks"].items():
            lines.append(f"| {d['domain']} | {task} | {r['items']} | {r['efx']['acc']:.3f} | {r['lm_eval']['acc']:.3f} | "
                         f"{r['efx']['acc_norm']:.3f} | {r['lm_eval']['acc_norm']:.3f} | "
                         f"{r['efx']['accuracy_norm']:.3f} | {r['max_loglik_difference']:.1e} |")
        lines += ["", f"File `benchmarks/results/{path.name}`, command `{d['command']}`, model {d['model']}; "
                      f"efx eval {d['seconds']['efx_eval']:.0f} s, lm_eval {d['seconds']['lm_eval']:.0f} s "
                      f"({_versions(d['versions'])})."]
    return lines + [""]


def render() -> str:
    lines = ["# Measured results", "",
             "Generated by `python benchmarks/render_results.py` from `benchmarks/results/*.json`; do not edit. "
             "Every figure was measured on a 2-core x86-64 CPU; all but the scale section with the embedded "
             "SmolLM2-135M-Instruct in fp32.", ""]
    for section in (retention_v3_section, retention_4x_section, retention_section, scale_section, static_section,
                    harness_section, pbs_section, overhead_section, formats_section):
        lines += section()
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/results.md differs from a fresh render")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python benchmarks/render_results.py", file=sys.stderr)
            return 1
        print(f"{OUTPUT.relative_to(ROOT)} is up to date")
        return 0
    sys.path.insert(0, str(ROOT))
    from efx.io import atomic_write_text
    atomic_write_text(OUTPUT, text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
