"""`efx compare`: several run folders in one table, retention vs sparsity per method, and the
refusals (too few runs, a folder that is not a run, runs of different domains, a non-empty output)."""
import json

import pytest

from efx.cli.main import main


def fake_run(folder, method, sparsity, retention, domain="medical", pattern="unstructured"):
    folder.mkdir(parents=True)
    report = {"settings": {"method": method, "preset": "efx", "pipeline": None, "sparsity": sparsity,
                           "pattern": pattern, "seed": 0, "domain": domain, "eval_items": None},
              "retention": {"overall": retention, "metric": "accuracy_norm"},
              "sparsity": {"overall": sparsity},
              "expert_eval": {"tasks": {"quiz": {"accuracy_norm": retention / 2}}, "perplexity": {"perplexity": 9.0}}}
    (folder / "report.json").write_text(json.dumps(report))
    return str(folder)


def test_compare_writes_table_and_plot(tmp_path, capsys):
    runs = [fake_run(tmp_path / "a", "efficientxpert", 0.4, 0.84), fake_run(tmp_path / "b", "efficientxpert", 0.5, 0.71),
            fake_run(tmp_path / "c", "wanda", 0.4, 0.85), fake_run(tmp_path / "d", "wanda", 0.5, 0.5, pattern="2:4")]
    out = tmp_path / "cmp"
    assert main(["compare", *runs, "--output", str(out)]) == 0
    table = (out / "compare.md").read_text()
    assert "| efficientxpert (efx) | 0.5 | 0 | 0.355 | 9.00 | **0.710** | 0.5000 |" in table
    assert "wanda (lora-prune) 2:4 | 2:4 |" in table
    assert (out / "retention_vs_sparsity.png").stat().st_size > 0  # efficientxpert has two sparsities
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["efficientxpert (efx)", "efficientxpert (efx)", "wanda (lora-prune)",
                                           "wanda (lora-prune) 2:4"]
    # a second comparison into the same folder is refused, nothing is touched
    assert main(["compare", *runs, "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compare", *runs[:2], "--output", str(out), "--overwrite"]) == 0
    assert len(json.loads((out / "compare.json").read_text())) == 2


@pytest.mark.parametrize("case, message", [("one", "at least two"), ("missing", "no report.json"),
                                           ("domains", "differ in domain")])
def test_compare_refuses_bad_input(tmp_path, capsys, case, message):
    a = fake_run(tmp_path / "a", "efficientxpert", 0.4, 0.84)
    other = {"one": [], "missing": [str(tmp_path)],
             "domains": [fake_run(tmp_path / "b", "efficientxpert", 0.5, 0.7, domain="legal")]}[case]
    out = tmp_path / "cmp"
    assert main(["compare", a, *other, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_compare_refuses_an_occupied_output_before_reading_runs(tmp_path):
    from efx.evaluation.compare import compare
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("user file")
    afile = tmp_path / "a_file"
    afile.write_text("user file")
    missing = [str(tmp_path / "nope1"), str(tmp_path / "nope2")]  # would raise FileNotFoundError if read first
    with pytest.raises(FileExistsError, match="not empty"):
        compare(missing, taken)
    with pytest.raises(FileExistsError, match="is a file"):
        compare(missing, afile, overwrite=True)
    assert (taken / "keep.txt").read_text() == "user file" and afile.read_text() == "user file"


def test_compare_gives_seed_mean_spread_and_the_paired_interval_against_the_best_baseline(tmp_path):
    def run(folder, method, seed, items, pipeline=None):
        folder.mkdir(parents=True)
        acc = sum(items) / len(items)
        report = {"settings": {"method": method, "preset": "efx", "pipeline": pipeline, "sparsity": 0.4,
                               "pattern": "unstructured", "seed": seed, "domain": "medical", "eval_items": None},
                  "retention": {"overall": acc / 0.75, "metric": "accuracy_norm"}, "sparsity": {"overall": 0.4},
                  "expert_eval": {"tasks": {"quiz": {"accuracy_norm": acc, "majority_baseline": 0.25,
                                                     "correct_norm": items}}},
                  "dense_eval": {"tasks": {"quiz": {"accuracy_norm": 0.75, "majority_baseline": 0.25}}}}
        (folder / "report.json").write_text(json.dumps(report))
        return str(folder)
    runs = [run(tmp_path / f"e{s}", "efficientxpert", s, [1, 1, 0, 0] * 10) for s in (0, 1)]
    runs += [run(tmp_path / f"s{s}", "sparsegpt", s, [1, 0, 0, 0] * 10 if s else [1, 1, 1, 0] * 10,
                 "prune-lora-reprune") for s in (0, 1)]
    runs += [run(tmp_path / "w0", "wanda", 0, [0, 0, 0, 0] * 10)]
    out = tmp_path / "cmp"
    assert main(["compare", *runs, "--output", str(out)]) == 0
    table = (out / "compare.md").read_text()
    # sparsegpt: retention 1.0 and 0.333, mean 0.667, spread 0.667; efficientxpert: 0.667 twice
    assert "| sparsegpt (prune-lora-reprune) | 0.4 | 0, 1 | 0.667 | 0.667 | best baseline |" in table
    # paired: ((0.5 - 0.75) + (0.5 - 0.25)) / 0.75 / 2 = 0.0
    assert "| efficientxpert (efx) | 0.4 | 0, 1 | 0.667 | 0.000 | +0.000 [" in table
    assert "| wanda (lora-prune) | 0.4 | 0 | 0.000 | 0.000 | -" in table
