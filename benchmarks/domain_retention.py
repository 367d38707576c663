"""Domain-retention benchmark: every method on the embedded model, same data, LoRA budget and
seed, scored relative to dense LoRA (method.md section 7).

    python benchmarks/domain_retention.py [--domains medical legal] [--sparsities 0.4 0.5 2:4]
        [--methods ...] [--seeds 0] [--n-examples 160] [--output benchmarks/results]

Results accumulate in domain_retention.json (one entry per domain/method/sparsity/seed, each
with its command, wall time and versions): a rerun skips what is there, so the benchmark can
run in parts. domain_retention.md is regenerated from the JSON after every entry.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from efx.data.suites import SUITE_VERSION, load_suite
from efx.evaluation.paired import against_best_baseline, interval_text
from efx.evaluation.evaluate import evaluate, retention
from efx.io import atomic_write_text
from efx.measure import measure
from efx.model.loading import load_model
from efx.recipes import calibration_batches, prune_and_adapt, unload
from efx.method.prune import PruneConfig, prune
from efx.evaluation.report import retention_plot, sparsity_audit, versions
from efx.cli.run import RunSettings
from efx.training import train_lora

log = logging.getLogger("domain_retention")

# name -> (PruneConfig fields, pipeline[, EfficientXpertCallback options]); fields None: what `efx run`
# does by default (RunSettings' defaults), whatever that is in this efx
METHODS = {
    "efx-run-default": (None, "inside"),
    "efficientxpert-efx-hessian": ({"method": "efficientxpert", "preset": "efx", "pbs_hessian": True}, "inside"),
    "efficientxpert-efx-reset": ({"method": "efficientxpert", "preset": "efx"}, "inside", {"reset_optimizer": True}),
    # recorded in the last 4 steps before each call (32 sequences, the calibration size)
    "efficientxpert-efx-trainstats-last4": ({"method": "efficientxpert", "preset": "efx"}, "inside",
                                            {"statistics": "training"}),
    # what `efx run --reset-optimizer` runs
    "efficientxpert-efx-trainstats-last4-reset": ({"method": "efficientxpert", "preset": "efx"}, "inside",
                                                  {"statistics": "training", "reset_optimizer": True}),
    # the same, ending with the base pruned and the adapter kept unmerged (efx run --keep-adapter)
    "efficientxpert-efx-trainstats-last4-keep-adapter": ({"method": "efficientxpert", "preset": "efx"}, "inside",
                                                         {"statistics": "training", "keep_adapter": True}),
    # gradual: the base pruned on a cubic ramp from step 10 to 40 of 60, one adapter kept throughout, on
    # training statistics (efx run's default before the rebuild at every call; the default is that ramp
    # with calibration statistics and PruneConfig.reconstruct)
    "efficientxpert-efx-ramp": ({"method": "efficientxpert", "preset": "efx"}, "inside",
                                {"statistics": "training", "schedule": "ramp", "every_steps": 10}),
    # SparseGPT's own mask and solve on the default's schedule (at N:M: one cut at the ramp's first call)
    "sparsegpt/ramp": ({"method": "sparsegpt"}, "inside", {"schedule": "ramp", "every_steps": 10}),
    "efficientxpert-efx": ({"method": "efficientxpert", "preset": "efx"}, "inside"),
    "efficientxpert-paper": ({"method": "efficientxpert", "preset": "paper"}, "inside"),
    "foresight": ({"method": "foresight", "preset": "efx"}, "inside"),
    "wanda/lora-prune": ({"method": "wanda"}, "lora-prune"),
    "wanda/prune-lora-reprune": ({"method": "wanda"}, "prune-lora-reprune"),
    "sparsegpt/lora-prune": ({"method": "sparsegpt"}, "lora-prune"),
    "sparsegpt/prune-lora-reprune": ({"method": "sparsegpt"}, "prune-lora-reprune"),
    "magnitude/lora-prune": ({"method": "magnitude"}, "lora-prune"),
}
UNSTRUCTURED_ONLY = {"efficientxpert-paper"}
BASELINE_PIPELINES = ("lora-prune", "prune-lora-reprune")
# efx options and screen variants, measured on demand (--methods NAME); the default run is the method list
VARIANTS = {name for name in METHODS if name.startswith("efficientxpert-efx")} | {"sparsegpt/ramp"}
N_TEST = 800  # items per task (or the whole test pool): a paired difference of 0.02 resolved over 3 seeds


def other_measurements(results: dict, domains, n_test: int, n_examples: int) -> str:
    """The rows of `domains` that a run with these settings must not join: measured on other test
    items (another suite version, rows from before it was recorded being v2, or another number of
    items per task, before it was recorded 300) or trained on another number of examples per
    epoch, as "medical v2 n300 e160, ..."; empty when there are none."""
    def measured(r):
        return (r.get("suite_version", 2), r.get("n_test", 300),
                r.get("settings", {}).get("n_examples", RunSettings.n_examples))
    found = sorted({"{} v{} n{} e{}".format(r["domain"], *measured(r)) for r in results.values()
                    if r["domain"] in domains and measured(r) != (SUITE_VERSION, n_test, n_examples)})
    return ", ".join(found)


def key(domain, method, sparsity, seed) -> str:
    return f"{domain}|{method}|{sparsity}|{seed}"


def prune_config(fields: dict, sparsity: str, seed: int) -> PruneConfig:
    pattern = sparsity if ":" in sparsity else "unstructured"
    return PruneConfig(**fields, sparsity=0.5 if pattern != "unstructured" else float(sparsity), pattern=pattern,
                       seed=seed)


def run_one(base, tokenizer, suite, settings: RunSettings, method: str, sparsity: str, dense_model=None) -> dict:
    fields, pipeline, *options = METHODS[method]
    if fields is None:  # efx run's defaults at this setting's pattern (the schedule depends on it)
        config = prune_config({}, sparsity, settings.seed)
        defaults = RunSettings(seed=settings.seed, pattern=config.pattern)
        fields = {k: v for k, v in asdict(defaults.prune_config()).items() if k not in ("sparsity", "pattern", "seed")}
        options = [defaults.callback_kwargs()]
    config = prune_config(fields, sparsity, settings.seed)
    calib = calibration_batches(tokenizer, suite.train, n=settings.calib, seed=settings.seed, system=suite.system)
    record: dict = {}
    if pipeline == "lora-prune" and dense_model is not None:
        # the dense LoRA model of this domain and seed, merged, then pruned: same budget by construction
        model = copy.deepcopy(dense_model)
        with measure(record, "prune"):
            calls = [prune(model, calib, replace(config, pbs=False, use_memory=False)).to_dict()]
        model = unload(model)
    else:
        callback = dict(options[0]) if options else {}
        keep_adapter = callback.pop("keep_adapter", False)
        with measure(record, "train"):
            model, report = prune_and_adapt(copy.deepcopy(base), tokenizer, suite.train, prune=config,
                                            lora=settings.lora(), training=settings.training(), pipeline=pipeline,
                                            calib=calib, system=suite.system, callback_kwargs=callback or None,
                                            keep_adapter=keep_adapter)
        calls = report["calls"]
    with measure(record, "eval"):
        result = evaluate(model, tokenizer, suite, max_items=settings.eval_items)
    audit = sparsity_audit(model)
    return {"eval": result, "sparsity": audit["overall"], "measure": record,
            "mask_overlap": [c.get("mask_overlap") for c in calls], "config": asdict(config), "pipeline": pipeline,
            "callback": options[0] if options else {}}


def dense_references(results: dict) -> dict:
    """(domain, seed) -> the dense-LoRA entry."""
    return {(r["domain"], r["seed"]): r for r in results.values() if r["method"] == "dense"}


def summary(results: dict) -> list[str]:
    """Per domain, one row per method and sparsity sorted by seed-0 retention within a sparsity:
    seed-0 scores, retention per seed and their mean."""
    dense = dense_references(results)
    lines = []
    for domain in sorted({r["domain"] for r in results.values()}):
        ref = dense.get((domain, 0))
        if ref is None:
            continue
        tasks = list(ref["eval"]["tasks"])
        seeds = sorted({r["seed"] for r in results.values() if r["domain"] == domain and (domain, r["seed"]) in dense})
        groups: dict[tuple, dict] = {}
        for r in results.values():
            if r["domain"] == domain and r["method"] != "dense" and (domain, r["seed"]) in dense:
                ret = retention(r["eval"], dense[(domain, r["seed"])]["eval"], metric="accuracy_norm")["overall"]
                groups.setdefault((r["method"], r["sparsity_setting"]), {})[r["seed"]] = (ret, r)
        ppl = ref["eval"]["perplexity"]["perplexity"]
        header = ["method", "sparsity", *tasks, "ppl", *(f"retention seed {s}" for s in seeds)] + \
            (["mean"] if len(seeds) > 1 else [])
        lines += [f"### {domain} (dense LoRA, seed 0: " + ", ".join(
            f"{t} {ref['eval']['tasks'][t]['accuracy_norm']:.3f}" for t in tasks) + f", ppl {ppl:.2f})", "",
            "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        order = sorted(groups, key=lambda g: (g[1] if ":" not in g[1] else "9" + g[1],
                                              -groups[g].get(0, (-1.0, None))[0]))
        for method, sparsity in order:
            runs = groups[(method, sparsity)]
            first = runs.get(0, next(iter(runs.values())))[1]
            cells = " | ".join(f"{first['eval']['tasks'][t]['accuracy_norm']:.3f}" for t in tasks)
            rets = " | ".join(f"**{runs[s][0]:.3f}**" if s in runs else "" for s in seeds)
            mean = ""
            if len(seeds) > 1:
                mean = f" | {sum(v[0] for v in runs.values()) / len(runs):.3f}" if len(runs) > 1 else " |"
            lines.append(f"| {method} | {sparsity} | {cells} | {first['eval']['perplexity']['perplexity']:.2f} | "
                         f"{rets}{mean} |")
        lines.append("")
    return lines


def is_baseline(method: str) -> bool:
    """A baseline is a method on a baseline pipeline (`X/lora-prune`, `X/prune-lora-reprune`); a
    baseline's mask inside the default's schedule (`sparsegpt/ramp`) is a variant like the others."""
    return method.rpartition("/")[2] in BASELINE_PIPELINES


def paired(results: dict) -> list[str]:
    """Per domain and sparsity: each method's retention, mean and spread (max - min) over its seeds,
    and the paired 95% interval of its task-retention difference to the best baseline (the
    baseline of highest mean, `is_baseline`), for rows evaluated with per-item results
    (efx.evaluation.paired)."""
    dense = dense_references(results)
    lines = []
    settings = sorted({(r["domain"], r["sparsity_setting"]) for r in results.values() if r["method"] != "dense"})
    for domain, sparsity in settings:
        by_method: dict[str, dict] = {}
        for r in results.values():
            if (r["domain"], r["sparsity_setting"]) == (domain, sparsity) and (domain, r["seed"]) in dense:
                by_method.setdefault(r["method"], {})[r["seed"]] = r
        methods = {m: {s: (retention(r["eval"], dense[(domain, s)]["eval"], metric="accuracy_norm")["overall"],
                           r["eval"]) for s, r in runs.items()} for m, runs in by_method.items()}
        table = against_best_baseline(methods, {s: dense[(domain, s)]["eval"] for d, s in dense if d == domain},
                                      is_baseline)
        if not any(row["difference"] for row in table):  # no baseline, or no per-item results
            continue
        best = next(row["method"] for row in table if row["best"])
        lines += [f"### {domain}, {sparsity} (best baseline: {best})", "",
                  "| method | seeds | mean retention | spread | task-retention difference to the best baseline "
                  "[paired 95%] |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {row['method']} | {len(row['seeds'])} | {row['mean']:.3f} | {row['spread']:.3f} | "
                  f"{interval_text(row['difference'])} |" for row in table] + [""]
    return lines


def markdown(results: dict) -> str:
    lines = ["# Domain retention on the embedded SmolLM2-135M-Instruct", "",
             "Scores are length-normalized multiple-choice accuracy (`accuracy_norm`). Retention = mean over a "
             "domain's tasks of method score / dense-LoRA score, with perplexity entering as dense_ppl / method_ppl "
             "(method.md section 7); `raw` is the same with unnormalized accuracy. Same data, LoRA budget and seed "
             "per row.", "", "## Summary", "",
             "Task scores and perplexity of seed 0; retention per seed (relative to the dense LoRA of the same seed).",
             ""] + summary(results)
    comparisons = paired(results)
    if comparisons:
        lines += ["## Paired against the best baseline", "",
                  "Task retention (perplexity left out), per-item paired bootstrap over the test items, pooled over "
                  "the seeds both methods ran (efx.evaluation.paired); rows without per-item results have no "
                  "interval.", ""] + comparisons
    dense = dense_references(results)
    for domain in sorted({r["domain"] for r in results.values()}):
        rows = [r for r in results.values() if r["domain"] == domain and r["method"] != "dense"]
        seeds = sorted({r["seed"] for r in rows} | {s for d, s in dense if d == domain})
        for seed in seeds:
            ref = dense.get((domain, seed))
            if ref is None:
                continue
            tasks = list(ref["eval"]["tasks"])
            lines += [f"## {domain}, seed {seed}", "",
                      "| model | " + " | ".join(f"{t} (norm / raw / majority)" for t in tasks) + " | ppl |",
                      "| --- | " + " | ".join("---" for _ in tasks) + " | --- |"]
            for label, ev in (("base model", ref["base_eval"]), ("dense LoRA", ref["eval"])):
                lines.append(f"| {label} | " + " | ".join(
                    f"{ev['tasks'][t]['accuracy_norm']:.3f} / {ev['tasks'][t]['accuracy']:.3f} / "
                    f"{ev['tasks'][t]['majority_baseline']:.3f}" for t in tasks)
                    + f" | {ev['perplexity']['perplexity']:.2f} |")
            lines += ["", "| method | sparsity | " + " | ".join(tasks) + " | ppl | retention | raw | measured sparsity |",
                      "| --- | --- | " + " | ".join("---" for _ in tasks) + " | --- | --- | --- | --- |"]
            for r in sorted((r for r in rows if r["seed"] == seed), key=lambda r: (r["sparsity_setting"], r["method"])):
                ret = retention(r["eval"], ref["eval"], metric="accuracy_norm")
                raw = retention(r["eval"], ref["eval"], metric="accuracy")
                cells = " | ".join(f"{r['eval']['tasks'][t]['accuracy_norm']:.3f}" for t in tasks)
                lines.append(f"| {r['method']} | {r['sparsity_setting']} | {cells} | "
                             f"{r['eval']['perplexity']['perplexity']:.2f} | **{ret['overall']:.3f}** | "
                             f"{raw['overall']:.3f} | {r['sparsity']:.4f} |")
            lines.append("")
    first = next(iter(results.values()), None)
    if first:
        lines += ["Settings: " + json.dumps(first["settings"]), "", "Versions: " + json.dumps(first["versions"]),
                  "", "Machine: " + first["machine"], ""]
    return "\n".join(lines)


def plot(results: dict, folder: Path) -> list[str]:
    """retention_vs_sparsity_<domain>.png for every domain with two or more unstructured sparsities:
    one line per method measured at two or more of them, the mean over its seeds with a bar from the
    lowest seed to the highest."""
    dense = dense_references(results)
    written = []
    for domain in sorted({r["domain"] for r in results.values()}):
        series: dict[str, list] = {}
        for r in results.values():
            ref = dense.get((domain, r["seed"]))
            if r["domain"] != domain or r["method"] == "dense" or ":" in r["sparsity_setting"] or ref is None:
                continue
            ret = retention(r["eval"], ref["eval"], metric="accuracy_norm")["overall"]
            series.setdefault(r["method"], []).append((float(r["sparsity_setting"]), ret))
        series = {method: points for method, points in series.items() if len({x for x, _ in points}) > 1}
        if series:
            written.append(retention_plot(series, folder / f"retention_vs_sparsity_{domain}.png",
                                          f"{domain}, unstructured (seed mean, bar: seed range)"))
    return written


def render(results: dict, path: Path) -> None:
    atomic_write_text(path.with_suffix(".md"), markdown(results))
    plot(results, path.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="+", default=["medical", "legal"])
    parser.add_argument("--sparsities", nargs="+", default=["0.4", "0.5", "2:4"])
    parser.add_argument("--methods", nargs="*", default=[m for m in METHODS if m not in VARIANTS],
                        help="none: only dense LoRA and the base model")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--n-test", type=int, default=N_TEST, help="test items per task (at most the test pool)")
    parser.add_argument("--n-examples", type=int, default=RunSettings.n_examples,
                        help="training examples per epoch, dense LoRA and every method alike (a folder holds one budget)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the JSON")
    args = parser.parse_args()
    if args.render:
        path = Path(args.output) / "domain_retention.json"
        render(json.loads(path.read_text()), path)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = Path(args.output) / "domain_retention.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    other = other_measurements(results, args.domains, args.n_test, args.n_examples)
    if other:
        sys.exit(f"{path} holds rows measured otherwise ({other}); this run evaluates suite v{SUITE_VERSION} with "
                 f"{args.n_test} items per task and trains on {args.n_examples} examples per epoch: write to a new "
                 "--output folder")
    command = " ".join(["python"] + sys.argv)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {__import__('torch').get_num_threads()}"

    def save(entry_key, entry):
        results[entry_key] = entry
        atomic_write_text(path, json.dumps(results, indent=1))
        render(results, path)

    base, tokenizer = load_model()
    for seed in args.seeds:
        # the shared budget; each method's own callback options are in METHODS (recorded per row)
        settings = RunSettings(seed=seed, statistics="calibration", n_examples=args.n_examples)
        for domain in args.domains:
            suite = load_suite(domain, seed=0, n_test=args.n_test)
            dense_key = key(domain, "dense", "-", seed)
            dense_model = None
            needs_dense_model = any(METHODS[m][1] == "lora-prune" and key(domain, m, s, seed) not in results
                                    for m in args.methods for s in args.sparsities)
            if dense_key not in results or needs_dense_model:
                started = time.perf_counter()
                record: dict = {}
                with measure(record, "train"):
                    dense_model, stats = train_lora(copy.deepcopy(base), tokenizer, suite.train, lora=settings.lora(),
                                                    training=settings.training(), system=suite.system)
                if dense_key not in results:
                    with measure(record, "eval"):
                        dense_eval = evaluate(dense_model, tokenizer, suite, max_items=settings.eval_items)
                    # the base model and the test split do not depend on the seed: reuse a stored base score
                    stored = [r["base_eval"] for r in results.values() if r["method"] == "dense"
                              and r["domain"] == domain and r["settings"].get("eval_items") == settings.eval_items]
                    base_eval = stored[0] if stored else evaluate(base, tokenizer, suite, max_items=settings.eval_items)
                    save(dense_key, {"domain": domain, "method": "dense", "sparsity_setting": "-", "seed": seed,
                                     "suite_version": SUITE_VERSION, "n_test": args.n_test,
                                     "eval": dense_eval, "base_eval": base_eval, "measure": record,
                                     "wall_seconds": time.perf_counter() - started, "settings": asdict(settings),
                                     "versions": versions(), "machine": machine, "command": command})
            for sparsity in args.sparsities:
                for method in args.methods:
                    if method in UNSTRUCTURED_ONLY and ":" in sparsity:
                        continue
                    entry_key = key(domain, method, sparsity, seed)
                    if entry_key in results:
                        continue
                    started = time.perf_counter()
                    log.info("running %s", entry_key)
                    entry = run_one(base, tokenizer, suite, settings, method, sparsity, dense_model)
                    entry.update({"domain": domain, "method": method, "sparsity_setting": sparsity, "seed": seed,
                                  "suite_version": SUITE_VERSION, "n_test": args.n_test,
                                  "wall_seconds": time.perf_counter() - started, "settings": asdict(settings),
                                  "versions": versions(), "machine": machine, "command": command})
                    save(entry_key, entry)
                    gc.collect()
            del dense_model
            gc.collect()


if __name__ == "__main__":
    main()
