"""Run reports: report.json, report.md and PNG plots, each written atomically."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from collections import defaultdict
from pathlib import Path

from efx.io import atomic_write_text
from efx.method.foresight import parse_pattern
from efx.method.prune import PruneConfig


def versions() -> dict:
    import torch
    import transformers
    import peft
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    return out


def sparsity_audit(model, folder: str | os.PathLike | None = None) -> dict:
    """Exact zeros of every target weight of `model`, counted in the safetensors files of `folder`
    (what was saved) or, without a folder, in the model itself; never read from masks. Negative
    zeros (-0.0) are counted apart: efx writes none, and some packers treat them as nonzeros."""
    from efx.model.arch import architecture_map, base_linear
    arch = architecture_map(model)
    names = {f"{block.qualified(role)}.weight": (block.index, role)
             for block in arch.blocks for role in block.targets}
    if folder is None:
        tensors = {f"{block.qualified(role)}.weight": base_linear(module).weight.detach()
                   for block in arch.blocks for role, module in block.targets.items()}.items()
    else:
        tensors = _saved_tensors(Path(folder), names)
    modules = {}
    for name, w in tensors:
        block, role = names[name]
        zero = w == 0
        modules[name.removesuffix(".weight")] = {
            "block": block, "role": role, "zeros": int(zero.sum()), "negative_zeros": int((zero & w.signbit()).sum()),
            "total": w.numel(), "sparsity": int(zero.sum()) / w.numel(), "dtype": str(w.dtype).replace("torch.", "")}
    missing = sorted(n.removesuffix(".weight") for n in names if n.removesuffix(".weight") not in modules)
    if missing:
        raise ValueError(f"{folder}: no saved weight for the targets {missing[:3]}")
    total = sum(m["total"] for m in modules.values())
    return {"overall": sum(m["zeros"] for m in modules.values()) / max(total, 1),
            "negative_zeros": sum(m["negative_zeros"] for m in modules.values()),
            "counted_in": "saved files" if folder is not None else "memory", "modules": modules}


def _saved_tensors(folder: Path, names):
    """(name, tensor) of the wanted names, one tensor in memory at a time, from every
    *.safetensors file of a saved Hugging Face folder."""
    from safetensors import safe_open
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors file to audit")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key in names:
                    yield key, handle.get_tensor(key)


def _fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The human-readable report."""
    s = report["settings"]
    nm = parse_pattern(s["pattern"])
    target = f"sparsity {s['sparsity']} (unstructured)" if nm is None else \
        f"pattern {s['pattern']} (sparsity {PruneConfig(pattern=s['pattern']).effective_sparsity:g})"
    lines = [f"# efx run: {s['method']} on {s['domain']}", "",
             f"Model `{s['model'] or 'embedded SmolLM2-135M-Instruct'}`, {target}, preset {s['preset']}, "
             f"seed {s['seed']}.", ""]
    if s.get("quick"):
        lines += ["**Smoke run (`--quick`)**: a tiny budget and 50 items per task. Its figures show that the "
                  "pipeline works, not what a full run retains.", ""]
    not_meaningful = report["retention"].get("not_meaningful", [])
    lines += ["## Scores", "",
             "| task | metric | base | dense LoRA | expert | retention | majority |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = report.get("base_eval") or {"tasks": {}}
    dense, expert = report["dense_eval"], report["expert_eval"]
    for task, scores in expert["tasks"].items():
        for metric in ("accuracy_norm", "accuracy", "macro_f1_norm"):
            b = base["tasks"].get(task, {}).get(metric)
            d, e = dense["tasks"][task][metric], scores[metric]
            kept = f"{_fmt(e / d if d else None)}" + (" (not meaningful)" if task in not_meaningful else "")
            lines.append(f"| {task} | {metric} | {_fmt(b)} | {_fmt(d)} | {_fmt(e)} | {kept} | "
                         f"{_fmt(scores['majority_baseline'])} |")
    if expert.get("perplexity"):
        b = (base.get("perplexity") or {}).get("perplexity")
        d, e = dense["perplexity"]["perplexity"], expert["perplexity"]["perplexity"]
        lines.append(f"| held-out text | perplexity | {_fmt(b, 2)} | {_fmt(d, 2)} | {_fmt(e, 2)} | {_fmt(d / e)} | — |")
    ret = report["retention"]
    lines += ["", f"Overall retention ({ret['metric']}, perplexity as dense/expert): **{ret['overall']:.3f}**"]
    if not_meaningful:
        lines += ["", f"Not meaningful, and left out of the overall: {', '.join(not_meaningful)}. Dense LoRA does "
                      "not beat the majority baseline there, so the task cannot show what pruning loses."]
    lines += ["",
              "## Sparsity audit (zeros counted in the saved weights)", "",
              f"Overall sparsity of the targets: **{report['sparsity']['overall']:.4f}**", "",
              "| module type | sparsity min | mean | max |", "| --- | --- | --- | --- |"]
    by_role = defaultdict(list)
    for m in report["sparsity"]["modules"].values():
        by_role[m["role"]].append(m["sparsity"])
    for role, values in by_role.items():
        lines.append(f"| {role} | {min(values):.4f} | {sum(values) / len(values):.4f} | {max(values):.4f} |")
    if report.get("packed"):
        lines += ["", f"Packed checkpoint (`expert_packed/`, format {report['packed']['format']}): "
                      f"{report['packed']['byte_ratio']:.4f} of the dense bytes of the targets."]
    calls = report.get("prune_calls", [])
    if calls:
        steps = report.get("record_steps")
        window = f", the last {steps} optimizer step{'s' * (steps != 1)} before each call" if steps else ""
        source = {"training": f"recorded during the training forwards{window} (no calibration pass)",
                  "calibration": "from a calibration pass per call"}.get(report.get("statistics"))
        schedule = {"ramp": "The base pruned on a cubic ramp to the target sparsity under one adapter, then merged "
                            "and pruned at train end.",
                    "epoch": "A call at the start of every epoch after the first (each merges the adapter and "
                             "re-initializes it) and one at train end."}.get(report.get("schedule"))
        rebuild = ["Each call chose the keeps of each group and rebuilt the kept weights by the OBS solve (SparseGPT's "
                   "rule on W + s*B@A, from E[x x^T])." if nm is not None else
                   "Each call rebuilt the kept weights under the ForeSight mask (the OBS update, from E[x x^T]).",
                   ""] if report.get("reconstruct") else []
        lines += ["", "## Pruning calls", ""] + ([schedule, ""] if schedule else []) + \
            ([f"Activation statistics {source}.", ""] if source else []) + rebuild + [
                  "| call | when | sparsity | mask overlap with previous | seconds |",
                  "| --- | --- | --- | --- | --- |"]
        for c in calls:
            lines.append(f"| {c['call']} | {c.get('when', '')} | {c['sparsity']:.4f} | {_fmt(c['mask_overlap'])} | "
                         f"{c['seconds']:.1f} |")
    cost = report["cost"]
    gpu = any(m.get("peak_cuda_mb") is not None for m in report["measure"].values())
    lines += ["", "## Cost (same machine, same run)", "",
              "| stage | seconds | peak RSS (MB) |" + (" peak GPU allocated (MB) |" if gpu else ""),
              "| --- | --- | --- |" + (" --- |" if gpu else "")]
    for stage, m in report["measure"].items():
        lines.append(f"| {stage} | {m['seconds']:.1f} | {m['peak_rss_mb']:.0f} |" +
                     (f" {_fmt(m.get('peak_cuda_mb'), 0)} |" if gpu else ""))
    lines += ["", f"Expert training vs dense LoRA training: time x{cost['time_ratio']:.3f}, "
                  f"peak RSS x{cost['memory_ratio']:.3f}.", "",
              "## Settings and versions", "", "```json", json.dumps({"settings": s, "versions": report["versions"],
                                                                      "suite": report["suite_info"]}, indent=2),
              "```", ""]
    return "\n".join(lines)


def plots(report: dict, folder: Path) -> list[str]:
    """score_per_task.png and sparsity_per_layer.png; returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = list(report["expert_eval"]["tasks"])
    series = [("base", report.get("base_eval")), ("dense LoRA", report["dense_eval"]),
              ("expert", report["expert_eval"])]
    series = [(name, ev) for name, ev in series if ev]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(series)
    for k, (name, ev) in enumerate(series):
        ax.bar([i + k * width for i in range(len(tasks))], [ev["tasks"][t]["accuracy_norm"] for t in tasks], width,
               label=name)
    ax.plot([i + 0.4 - width / 2 for i in range(len(tasks))],
            [report["expert_eval"]["tasks"][t]["majority_baseline"] for t in tasks], "k_", markersize=20,
            label="majority")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy (length-normalized)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{report['settings']['domain']}: scores per task")
    written.append(_save(fig, folder / "score_per_task.png"))

    by_role = defaultdict(dict)
    for m in report["sparsity"]["modules"].values():
        by_role[m["role"]][m["block"]] = m["sparsity"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for role, values in by_role.items():
        blocks = sorted(values)
        ax.plot(blocks, [values[b] for b in blocks], marker=".", label=role)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, min(1.0, max(max(v.values()) for v in by_role.values()) + 0.1))
    ax.legend(fontsize=7, ncol=4)
    ax.set_title("sparsity per layer and module type")
    written.append(_save(fig, folder / "sparsity_per_layer.png"))
    return written


def retention_plot(series: dict[str, list[tuple[float, float]]], path: Path, title: str = "") -> str:
    """Retention against sparsity, one line per method (for results covering several sparsities).
    Several points at one sparsity (seeds) are drawn as their mean with a bar from the lowest to
    the highest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = plt.get_cmap("tab10").colors
    for i, (label, points) in enumerate(sorted(series.items())):  # past ten lines, the colors repeat dashed
        by_x: dict[float, list[float]] = {}
        for x, y in points:
            by_x.setdefault(x, []).append(y)
        xs = sorted(by_x)
        means = [sum(by_x[x]) / len(by_x[x]) for x in xs]
        bars = [[m - min(by_x[x]) for x, m in zip(xs, means)], [max(by_x[x]) - m for x, m in zip(xs, means)]]
        ax.errorbar(xs, means, yerr=bars if any(len(v) > 1 for v in by_x.values()) else None, marker="o",
                    label=label, color=colors[i % len(colors)], ls=("-", "--", ":")[i // len(colors) % 3], capsize=3)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.axhline(0.98, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("retention vs dense LoRA")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path.name


def write_report(report: dict, folder: Path) -> None:
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2))
    report["plots"] = plots(report, folder)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2))
    atomic_write_text(folder / "report.md", markdown(report))
