"""Paired comparison of two methods' retention on the same test items, pooled over seeds.

Retention difference of method A over method B: the mean over tasks of
(accuracy_A - accuracy_B) / accuracy_dense, each seed's dense reference for that seed's pair,
averaged over the seeds both methods ran. Its 95% interval comes from a paired bootstrap: the
test items of each task are resampled with replacement, the same draw for every seed and for
both methods (the test items do not change with the seed), and the difference recomputed.
Tasks where dense LoRA does not beat the majority baseline are left out, as in `retention`.
"""
from __future__ import annotations

import numpy as np

METRIC = "correct_norm"  # per-item correctness of the headline metric, accuracy_norm


def _counted_tasks(dense_evals: list[dict]) -> list[str]:
    tasks = list(dense_evals[0]["tasks"])
    return [t for t in tasks if all(d["tasks"][t]["accuracy_norm"] > d["tasks"][t]["majority_baseline"]
                                    for d in dense_evals)]


def retention_difference(a: dict[int, dict], b: dict[int, dict], dense: dict[int, dict], *, boot: int = 2000,
                         seed: int = 0) -> dict:
    """a, b, dense: seed -> evaluation result (`evaluate`'s dict, with per-item `correct_norm`).
    Returns {difference, low, high, seeds, tasks, items}; None where no seed has per-item
    results for both methods."""
    seeds = sorted(s for s in set(a) & set(b) & set(dense)
                   if all(METRIC in t for r in (a[s], b[s]) for t in r["tasks"].values()))
    if not seeds:
        return None
    tasks = _counted_tasks([dense[s] for s in seeds])
    if not tasks:
        return None
    rng = np.random.default_rng(seed)
    estimates = np.zeros(boot + 1)
    for task in tasks:
        # (seeds, items) per-item differences scaled by that seed's dense accuracy
        diff = np.array([(np.array(a[s]["tasks"][task][METRIC]) - np.array(b[s]["tasks"][task][METRIC]))
                         / dense[s]["tasks"][task]["accuracy_norm"] for s in seeds])
        n = diff.shape[1]
        draws = rng.integers(0, n, size=(boot, n))
        per_seed = diff.mean(axis=1).mean()
        resampled = diff[:, draws].mean(axis=2).mean(axis=0)  # (boot,)
        estimates += np.concatenate([[per_seed], resampled]) / len(tasks)
    low, high = np.percentile(estimates[1:], [2.5, 97.5])
    return {"difference": float(estimates[0]), "low": float(low), "high": float(high), "seeds": seeds,
            "tasks": tasks, "items": {t: len(a[seeds[0]]["tasks"][t][METRIC]) for t in tasks}}


def against_best_baseline(methods: dict[str, dict[int, tuple[float, dict]]], dense: dict[int, dict],
                          is_baseline) -> list[dict]:
    """One row per method of one setting, highest mean retention first: its seeds, the mean and
    spread (max - min) of its retentions, whether it is the best baseline (the baseline of highest
    mean), and its `retention_difference` to that baseline (None for the baseline itself, without
    a baseline, or without per-item results).

    methods: method -> seed -> (retention, evaluation result); dense: seed -> evaluation result
    of dense LoRA."""
    means = {m: sum(r for r, _ in runs.values()) / len(runs) for m, runs in methods.items()}
    baselines = [m for m in methods if is_baseline(m)]
    best = max(baselines, key=means.get) if baselines else None
    rows = []
    for method in sorted(methods, key=lambda m: -means[m]):
        runs = methods[method]
        values = [r for r, _ in runs.values()]
        diff = None
        if best is not None and method != best:
            diff = retention_difference({s: e for s, (_, e) in runs.items()},
                                        {s: e for s, (_, e) in methods[best].items()}, dense)
        rows.append({"method": method, "seeds": sorted(runs), "mean": means[method],
                     "spread": max(values) - min(values), "best": method == best, "difference": diff})
    return rows


def interval_text(diff: dict | None) -> str:
    return "" if diff is None else f"{diff['difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"
