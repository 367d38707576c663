"""Paired retention differences: by hand, and the bootstrap interval's behaviour."""
import pytest

from efx.evaluation.paired import retention_difference


def result(per_task: dict) -> dict:
    """An evaluation result with per-item correctness; majority baseline 0.25."""
    return {"tasks": {t: {"correct_norm": items, "accuracy_norm": sum(items) / len(items), "majority_baseline": 0.25}
                      for t, items in per_task.items()}}


def dense(acc: dict) -> dict:
    return {"tasks": {t: {"accuracy_norm": v, "majority_baseline": 0.25} for t, v in acc.items()}}


def test_the_difference_by_hand_pooled_over_seeds_and_meaningless_tasks_left_out():
    a = {0: result({"t": [1, 1, 0, 1], "flat": [1, 0, 0, 0]}), 1: result({"t": [1, 1, 1, 1], "flat": [0, 0, 0, 0]})}
    b = {0: result({"t": [1, 0, 0, 1], "flat": [0, 0, 0, 0]}), 1: result({"t": [1, 1, 1, 1], "flat": [1, 1, 1, 1]})}
    ref = {0: dense({"t": 0.5, "flat": 0.2}), 1: dense({"t": 0.8, "flat": 0.25})}  # "flat": dense <= majority
    got = retention_difference(a, b, ref, boot=500)
    # seed 0: (3/4 - 2/4) / 0.5 = 0.5; seed 1: 0; mean 0.25
    assert got["difference"] == pytest.approx(0.25) and got["tasks"] == ["t"] and got["seeds"] == [0, 1]
    assert got["low"] <= 0.25 <= got["high"] and got["low"] >= 0.0  # no resample makes A worse here
    assert got["high"] <= 1.0  # at most every item of seed 0 (2 / 4 / 0.5 averaged with 0)


def test_identical_methods_have_a_zero_interval_and_missing_items_give_none():
    a = {s: result({"t": [1, 0, 1, 1, 0, 1]}) for s in (0, 1, 2)}
    ref = {s: dense({"t": 0.7}) for s in (0, 1, 2)}
    got = retention_difference(a, a, ref)
    assert (got["difference"], got["low"], got["high"]) == (0.0, 0.0, 0.0)
    no_items = {0: {"tasks": {"t": {"accuracy_norm": 0.5, "majority_baseline": 0.25}}}}
    assert retention_difference(no_items, a, ref) is None


def test_the_interval_narrows_with_more_items():
    import random
    rng = random.Random(0)

    def draws(p, n):
        return [int(rng.random() < p) for _ in range(n)]
    widths = []
    for n in (100, 1600):
        a = {s: result({"t": draws(0.7, n)}) for s in (0, 1, 2)}
        b = {s: result({"t": draws(0.6, n)}) for s in (0, 1, 2)}
        got = retention_difference(a, b, {s: dense({"t": 0.7}) for s in (0, 1, 2)}, boot=1000)
        widths.append(got["high"] - got["low"])
    assert widths[1] < widths[0] / 3  # about 1 / sqrt(16) = 1 / 4 as wide


def test_the_retention_report_prints_the_paired_interval_against_the_best_baseline():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("domain_retention",
                                                  Path(__file__).parent.parent / "benchmarks" / "domain_retention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def row(method, seed, items, ppl=10.0):
        ev = result({"t": items})
        ev["perplexity"] = {"perplexity": ppl}
        return {"domain": "d", "method": method, "sparsity_setting": "0.4", "seed": seed, "eval": ev}
    results = {}
    for seed in (0, 1, 2):
        ref = row("dense", seed, [1, 1, 1, 0] * 10)
        ref["sparsity_setting"] = "-"
        results[f"dense{seed}"] = ref
        results[f"a{seed}"] = row("efficientxpert-efx", seed, [1, 1, 0, 0] * 10)
        results[f"b{seed}"] = row("sparsegpt/prune-lora-reprune", seed, [1, 0, 0, 0] * 10)
        results[f"c{seed}"] = row("wanda/lora-prune", seed, [0, 0, 0, 0] * 10)
        # SparseGPT's mask on the default's schedule: a variant, not a baseline, however well it does
        results[f"v{seed}"] = row("sparsegpt/ramp", seed, [1, 1, 1, 0] * 10)
    lines = "\n".join(module.paired(results))
    assert "### d, 0.4 (best baseline: sparsegpt/prune-lora-reprune)" in lines
    assert "| sparsegpt/ramp | 3 | 1.000 | 0.000 | +0.667 [" in lines
    # efx: (0.5 - 0.25) / 0.75 = +0.333 over the best baseline on every seed; mean retention (0.5/0.75 + 1) / 2
    assert "| efficientxpert-efx | 3 | 0.833 | 0.000 | +0.333 [" in lines
    assert "| sparsegpt/prune-lora-reprune | 3 | 0.667 | 0.000 |  |" in lines
