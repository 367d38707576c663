"""`efx compare`: several `efx run` output folders of one domain side by side, with retention
against sparsity for each method that was run at more than one sparsity."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from efx.evaluation.paired import against_best_baseline, interval_text
from efx.io import atomic_folder, check_output_free
from efx.method.prune import FORESIGHT_METHODS
from efx.evaluation.report import retention_plot


def method_label(settings: dict) -> str:
    """A method with the options that make it a different line on the plot."""
    label = settings["method"]
    if label in FORESIGHT_METHODS:
        label += f" ({settings.get('preset', 'efx')})"
    elif label != "dense":
        label += f" ({settings.get('pipeline') or 'lora-prune'})"
    if settings.get("pattern", "unstructured") != "unstructured":
        label += f" {settings['pattern']}"
    return label


def load_reports(runs: list[str | Path]) -> list[tuple[Path, dict]]:
    """(folder, report.json) of every run; all of one domain and one evaluation budget."""
    if len(runs) < 2:
        raise ValueError("efx compare needs at least two run folders")
    loaded = []
    for run in map(Path, runs):
        path = run / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run} holds no report.json: not a finished efx run folder")
        loaded.append((run, json.loads(path.read_text())))
    for key in ("domain", "eval_items"):
        values = {json.dumps(report["settings"].get(key)) for _, report in loaded}
        if len(values) > 1:
            raise ValueError(f"runs differ in {key} ({', '.join(sorted(values))}): their retentions are not "
                             "comparable")
    return loaded


def compare(runs: list[str | Path], output: str | Path, *, overwrite: bool = False) -> dict:
    """Write compare.md (one row per run) and, where a method was run at two or more
    unstructured sparsities, retention_vs_sparsity.png into `output`. Returns the table rows."""
    check_output_free(output, overwrite=overwrite)  # before any run is read
    loaded = load_reports(runs)
    rows = []
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run, report in sorted(loaded, key=lambda item: (method_label(item[1]["settings"]),
                                                        item[1]["settings"]["sparsity"])):
        s = report["settings"]
        row = {"run": str(run), "method": method_label(s), "sparsity": s["sparsity"], "pattern": s["pattern"],
               "seed": s["seed"], "retention": report["retention"]["overall"],
               "measured_sparsity": report["sparsity"]["overall"],
               "tasks": {t: v[report["retention"]["metric"]] for t, v in report["expert_eval"]["tasks"].items()},
               "perplexity": (report["expert_eval"].get("perplexity") or {}).get("perplexity")}
        rows.append(row)
        if s["pattern"] == "unstructured" and s["method"] != "dense":
            series[row["method"]].append((s["sparsity"], row["retention"]))
    tasks = sorted({t for row in rows for t in row["tasks"]})
    domain = loaded[0][1]["settings"]["domain"]
    lines = [f"# efx compare: {domain}", "",
             f"Retention relative to each run's own dense LoRA ({loaded[0][1]['retention']['metric']}; "
             "perplexity as dense / expert).", "",
             "| run | method | sparsity | seed | " + " | ".join(tasks) + " | ppl | retention | measured sparsity |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " | --- | --- | --- |"]
    for row in rows:
        setting = row["sparsity"] if row["pattern"] == "unstructured" else row["pattern"]
        cells = " | ".join(f"{row['tasks'][t]:.3f}" if t in row["tasks"] else "—" for t in tasks)
        ppl = f"{row['perplexity']:.2f}" if row["perplexity"] else "—"
        lines.append(f"| {row['run']} | {row['method']} | {setting} | {row['seed']} | {cells} | {ppl} | "
                     f"**{row['retention']:.3f}** | {row['measured_sparsity']:.4f} |")
    lines += [""] + _by_method(loaded)
    plotted = {label: points for label, points in series.items() if len({p[0] for p in points}) > 1}
    with atomic_folder(output, overwrite=overwrite) as folder:
        (folder / "compare.md").write_text("\n".join(lines) + "\n")
        (folder / "compare.json").write_text(json.dumps(rows, indent=2))
        if plotted:
            retention_plot(plotted, folder / "retention_vs_sparsity.png", f"{domain}: retention vs sparsity")
    return {"rows": rows, "plotted": sorted(plotted)}


def _by_method(loaded: list[tuple[Path, dict]]) -> list[str]:
    """Per method and setting: the seeds, their mean retention and spread (max - min), and the
    paired 95% interval of the task-retention difference to the best baseline of that setting
    (runs with per-item results only; efx.evaluation.paired)."""
    groups: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for _, report in loaded:
        s = report["settings"]
        setting = str(s["sparsity"]) if s["pattern"] == "unstructured" else s["pattern"]
        groups[(method_label(s), setting)][s["seed"]] = report
    lines = ["## By method", "", "Mean and spread (max - min) of retention over seeds; the last column: task-retention "
             "difference to the best baseline of the setting (highest mean), paired bootstrap 95% over the same "
             "test items, pooled over the seeds both ran.", "",
             "| method | setting | seeds | mean retention | spread | vs best baseline [95%] |",
             "| --- | --- | --- | --- | --- | --- |"]
    for setting in sorted({k[1] for k in groups}):
        runs = {m: reports for (m, st), reports in groups.items() if st == setting}
        methods = {m: {s: (r["retention"]["overall"], r["expert_eval"]) for s, r in reports.items()}
                   for m, reports in runs.items()}
        dense = {s: r["dense_eval"] for reports in runs.values() for s, r in reports.items() if "dense_eval" in r}
        for row in against_best_baseline(methods, dense,
                                         lambda m: not m.startswith(FORESIGHT_METHODS) and m != "dense"):
            cell = "best baseline" if row["best"] else interval_text(row["difference"])
            lines.append(f"| {row['method']} | {setting} | {', '.join(map(str, row['seeds']))} | {row['mean']:.3f} | "
                         f"{row['spread']:.3f} | {cell} |")
    return lines
