"""The retention benchmark's tables: retention per seed against the dense LoRA of that seed,
their mean, and rows sorted by retention within a sparsity."""
import importlib.util
from pathlib import Path


def load_benchmark():
    path = Path(__file__).parent.parent / "benchmarks" / "domain_retention.py"
    spec = importlib.util.spec_from_file_location("domain_retention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(method, sparsity, seed, acc, ppl):
    return {"domain": "medical", "method": method, "sparsity_setting": sparsity, "seed": seed, "sparsity": 0.4,
            "eval": {"tasks": {"t": {"accuracy_norm": acc, "accuracy": acc, "majority_baseline": 0.25}},
                     "perplexity": {"perplexity": ppl}},
            "base_eval": {"tasks": {"t": {"accuracy_norm": 0.3, "accuracy": 0.3, "majority_baseline": 0.25}},
                          "perplexity": {"perplexity": 50.0}},
            "settings": {}, "versions": {}, "machine": "test"}


def test_summary_retention_per_seed_mean_and_order():
    bench = load_benchmark()
    rows = [entry("dense", "-", 0, 0.8, 10.0), entry("dense", "-", 1, 0.5, 20.0),
            entry("a", "0.4", 0, 0.4, 20.0),   # (0.5 + 0.5) / 2 = 0.5
            entry("a", "0.4", 1, 0.5, 20.0),   # (1.0 + 1.0) / 2 = 1.0 (its own dense reference)
            entry("b", "0.4", 0, 0.8, 10.0),   # 1.0
            entry("b", "2:4", 0, 0.6, 20.0)]   # (0.75 + 0.5) / 2 = 0.625
    results = {str(i): r for i, r in enumerate(rows)}
    lines = [line for line in bench.summary(results) if line.startswith("| ") and "---" not in line]
    assert lines[0].startswith("| method | sparsity | t | ppl | retention seed 0 | retention seed 1 | mean |")
    assert [line.split(" | ")[0][2:] + "@" + line.split(" | ")[1] for line in lines[1:]] == \
        ["b@0.4", "a@0.4", "b@2:4"]
    cells = lines[2].split(" | ")
    assert cells[4:] == ["**0.500**", "**1.000**", "0.750 |"]
    assert "**0.625**" in lines[3]


def test_the_plot_draws_every_seed_of_a_method_measured_at_two_sparsities(tmp_path, monkeypatch):
    bench = load_benchmark()
    drawn = {}
    monkeypatch.setattr(bench, "retention_plot", lambda series, path, title: drawn.update(series) or path.name)
    rows = [entry("dense", "-", 0, 0.8, 10.0), entry("dense", "-", 1, 0.5, 20.0),
            entry("a", "0.4", 0, 0.4, 20.0), entry("a", "0.4", 1, 0.5, 20.0), entry("a", "0.5", 0, 0.2, 20.0),
            entry("b", "0.4", 0, 0.8, 10.0), entry("b", "0.4", 1, 0.5, 20.0),  # one sparsity: no line
            entry("a", "2:4", 0, 0.6, 20.0)]                                   # N:M: not on the axis
    assert bench.plot({str(i): r for i, r in enumerate(rows)}, tmp_path) == ["retention_vs_sparsity_medical.png"]
    assert sorted(drawn) == ["a"]
    assert sorted(drawn["a"]) == [(0.4, 0.5), (0.4, 1.0), (0.5, 0.125 + 0.25)]


def test_results_page_is_generated_from_the_result_files(tmp_path, monkeypatch):
    """docs/results.md is what render_results.py makes of benchmarks/results/*.json, and --check
    fails once a result file changes."""
    import json
    import shutil
    import subprocess
    import sys
    script = Path(__file__).parent.parent / "benchmarks" / "render_results.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spec = importlib.util.spec_from_file_location("render_results", script)
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    copy = tmp_path / "results"
    shutil.copytree(render.RESULTS, copy)
    speed = json.loads((copy / "pbs_speed.json").read_text())
    speed["results"][0]["speedup"] *= 2
    (copy / "pbs_speed.json").write_text(json.dumps(speed))
    monkeypatch.setattr(render, "RESULTS", copy)
    assert render.main(["--check"]) == 1


def test_scale_benchmark_measures_a_call_and_writes_its_row(tmp_path):
    """One case of benchmarks/scale.py end to end (its own process, a 2-layer narrow model)."""
    import json
    import subprocess
    import sys
    script = Path(__file__).parent.parent / "benchmarks" / "scale.py"
    done = subprocess.run([sys.executable, str(script), "--cases", "call:narrow:2", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "scale_cpu.json").read_text())
    row = result["rows"][0]
    assert row["case"] == "call:narrow:2" and row["layer_target_mb"] == 26.0  # 13.6 M bf16 target weights a layer
    assert row["call_seconds"] > 0 and row["extra_peak_rss_mb"] > 0
    assert result["extrapolation"]["plan_gb"]["total"] > result["extrapolation"]["plan_gb"]["model"]


def test_the_retention_grid_refuses_to_mix_rows_of_another_suite_version(tmp_path, monkeypatch):
    import json
    import sys

    import pytest
    from efx.data.suites import SUITE_VERSION
    bench = load_benchmark()
    old = entry("efficientxpert-efx", "0.4", 0, 0.7, 10.0)  # a row from before versions were recorded: v2
    assert bench.other_measurements({"a": old}, ["medical"], 300, 160) == "medical v2 n300 e160"
    assert bench.other_measurements({"a": old}, ["legal"], 300, 160) == ""
    current = dict(old, suite_version=SUITE_VERSION)
    assert bench.other_measurements({"a": current}, ["medical"], 300, 160) == ""  # 300 items: rows from before n_test
    assert bench.other_measurements({"a": current}, ["medical"], 800, 160) == f"medical v{SUITE_VERSION} n300 e160"
    assert bench.other_measurements({"a": dict(current, n_test=800)}, ["medical"], 800, 160) == ""
    longer = dict(current, n_test=800, settings={"n_examples": 640})
    assert bench.other_measurements({"a": longer}, ["medical"], 800, 160) == f"medical v{SUITE_VERSION} n800 e640"
    (tmp_path / "domain_retention.json").write_text(json.dumps({"medical|efficientxpert-efx|0.4|0": old}))
    monkeypatch.setattr(sys, "argv", ["domain_retention.py", "--domains", "medical", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="measured otherwise \\(medical v2 n300 e160\\)"):
        bench.main()


def test_the_retention_grid_refuses_to_mix_training_budgets_in_one_folder(tmp_path, monkeypatch):
    import json
    import sys

    import pytest
    from efx.data.suites import SUITE_VERSION
    bench = load_benchmark()
    row = dict(entry("efx-run-default", "0.4", 0, 0.7, 10.0), suite_version=SUITE_VERSION, n_test=bench.N_TEST,
               settings={"n_examples": 160})
    (tmp_path / "domain_retention.json").write_text(json.dumps({"medical|efx-run-default|0.4|0": row}))
    monkeypatch.setattr(sys, "argv", ["domain_retention.py", "--domains", "medical", "--n-examples", "640",
                                      "--output", str(tmp_path)])
    budget = f"\\(medical v{SUITE_VERSION} n{bench.N_TEST} e160\\).* trains on 640 examples per epoch"
    with pytest.raises(SystemExit, match=budget):
        bench.main()
