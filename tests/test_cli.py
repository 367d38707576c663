"""`efx run` end to end on a tiny model and user data: outputs, refusal to overwrite, resume,
bad options failing before any work, export and eval."""
import json

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from efx.cli.main import main
from efx.evaluation.report import markdown


@pytest.fixture
def tiny_setup(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=256).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    words = ["alpha", "beta", "gamma", "delta"]
    (data / "train.jsonl").write_text("\n".join(json.dumps({"prompt": f"say {w}", "completion": w})
                                                for w in words * 4))
    (data / "quiz.jsonl").write_text("\n".join(json.dumps({"prompt": f"say {w}", "choices": words, "answer": i})
                                               for i, w in enumerate(words)))
    (data / "ppl.jsonl").write_text(json.dumps({"text": "say alpha and beta"}))
    args = ["run", "--model", str(model_dir), "--domain", str(data), "--epochs", "2", "--n-examples", "8",
            "--batch-size", "4", "--calib", "4", "--sparsity", "0.5"]
    return tmp_path, args


def test_run_writes_expert_report_and_plots(tiny_setup, capsys):
    tmp_path, args = tiny_setup
    out = tmp_path / "out"
    assert main(args + ["--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=0.02)
    assert {"quiz"} == set(report["expert_eval"]["tasks"])
    # 4 steps: the ramp's calls after steps 1 and 2 (two thirds), then the final one
    assert [c["when"] for c in report["prune_calls"]] == ["step 1", "step 2", "train end"]
    assert report["schedule"] == "ramp" and report["packed"]["format"] == "bitmap"
    assert "The base pruned on a cubic ramp" in (out / "report.md").read_text()
    # "auto" on the ramp: a calibration pass per call, and each call rebuilds the kept weights
    assert report["statistics"] == "calibration" and report["reconstruct"] and report["record_steps"] is None
    assert "Each call rebuilt the kept weights" in (out / "report.md").read_text()
    assert "sparsity 0.5 (unstructured)" in (out / "report.md").read_text()
    # the same report for a 2:4 run names the pattern's sparsity (not --sparsity) and the mask the solve chose
    report_24 = json.loads(json.dumps(report))
    report_24["settings"].update(pattern="2:4", sparsity=0.4)
    text_24 = markdown(report_24)
    assert "pattern 2:4 (sparsity 0.5)" in text_24 and "sparsity 0.4" not in text_24
    assert "Each call chose the keeps of each group" in text_24
    for name in ("report.md", "score_per_task.png", "sparsity_per_layer.png", "expert/config.json",
                 "expert_packed/efx_sparse.json"):
        assert (out / name).is_file(), name
    # a second run into the same folder is refused, nothing is touched
    before = (out / "report.json").read_text()
    assert main(args + ["--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.json").read_text() == before
    # resume finds every stage done and rewrites the same report
    assert main(args + ["--output", str(out), "--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["expert_eval"] == report["expert_eval"]
    # export and eval of the saved expert
    assert main(["export", "--model", str(out / "expert"), "--output", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "hf" / "config.json").is_file()
    assert main(["eval", "--model", str(out / "expert"), "--domain", args[4], "--output",
                 str(tmp_path / "eval.json")]) == 0
    assert "quiz" in json.loads((tmp_path / "eval.json").read_text())["tasks"]
    # statistics recorded during training: no calibration pass, no rebuild
    assert main(args + ["--output", str(tmp_path / "recorded"), "--statistics", "training"]) == 0
    recorded = json.loads((tmp_path / "recorded" / "report.json").read_text())
    assert recorded["statistics"] == "training" and not recorded["reconstruct"]
    assert recorded["record_steps"] == 1  # --calib 4 sequences at --batch-size 4
    assert "recorded during the training forwards, the last 1 optimizer step before each call" in \
        (tmp_path / "recorded" / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.2"], "outside"), (["--method", "obs"], "--method"),
    (["--pattern", "3:2"], "N:M"), (["--domain", "/no/such/data"], "--domain"),
    (["--epochs", "1"], "epochs >= 2"), (["--pipeline", "lora-prune"], "--pipeline"),
    (["--statistics", "weights"], "--statistics"), (["--statistics", "training", "--method", "wanda"], "applies to"),
    (["--reset-optimizer", "--method", "sparsegpt"], "--reset-optimizer applies to"),
    (["--reset-optimizer"], "re-initializes the adapter (--preset paper)"),
    (["--dtype", "float16", "--device", "cpu"], "cannot train on a CPU"), (["--dtype", "half"], "--dtype"),
    (["--device", "tpu"], "--device"), (["--max-length", "0"], "--max-length"), (["--grad-accum", "0"], "--grad-accum"),
] + ([(["--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else []))
def test_bad_options_fail_before_any_work(tiny_setup, extra, message, capsys):
    tmp_path, args = tiny_setup
    out = tmp_path / "never"
    assert main(args + ["--output", str(out)] + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_auto_statistics_resolve_per_method():
    from efx.cli.run import RunSettings
    # the ramp: a calibration pass per call and the kept weights rebuilt; elsewhere training statistics
    assert RunSettings().callback_statistics == "calibration" and RunSettings().prune_config().reconstruct
    assert RunSettings(method="foresight").callback_statistics == "calibration"
    assert RunSettings(preset="paper").callback_statistics == "training"
    assert not RunSettings(preset="paper").prune_config().reconstruct
    assert RunSettings(fsdp=True).callback_statistics == "training" and not RunSettings(fsdp=True).reconstruct
    assert RunSettings(method="wanda").callback_statistics == "calibration" and not RunSettings(method="wanda").reconstruct
    assert RunSettings(statistics="training").callback_statistics == "training"
    assert not RunSettings(statistics="training").prune_config().reconstruct


def test_the_efx_preset_prunes_on_the_ramp_and_the_paper_preset_per_epoch():
    from efx.cli.run import RunSettings
    assert RunSettings().callback_kwargs() == {"statistics": "calibration", "schedule": "ramp", "reset_optimizer": False}
    assert RunSettings(preset="paper").callback_schedule == "epoch"  # the authors' schedule
    assert RunSettings(pattern="2:4").callback_schedule == "ramp"  # one cut of the base, then the adapter trains
    assert RunSettings(pattern="2:4").reconstruct
    RunSettings(preset="paper", reset_optimizer=True).validate()  # the epoch schedule re-initializes the adapter


def test_training_statistics_record_the_steps_that_hold_the_calibration_size():
    from efx.cli.run import RunSettings
    assert RunSettings(statistics="training").callback_record_steps == 4  # 32 sequences at batch 8
    assert RunSettings(statistics="training", calib=20, batch_size=8).callback_record_steps == 3
    assert RunSettings(statistics="training", calib=20, batch_size=4, grad_accum=2).callback_record_steps == 3
    assert RunSettings().callback_record_steps is None


def test_config_file_and_unknown_keys(tiny_setup, capsys):
    tmp_path, args = tiny_setup
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"sparsity": 0.3, "lora_rank": 4}))
    assert main(args + ["--config", str(config), "--output", str(tmp_path / "x")]) == 2
    assert "unknown settings ['lora_rank']" in capsys.readouterr().err


def test_bench_checks_names_first_and_writes_json(tmp_path, capsys):
    assert main(["bench", "--only", "pbs", "nope", "--output", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert main(["bench", "--only", "pbs", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pbs_speed.json").read_text())
    assert [r["keep_weight"] for r in result["results"]] == [1.0, 0.5]
    assert all(r["max_abs_diff_vs_fp64_loop"] < 1e-6 for r in result["results"])


def test_export_refuses_occupied_output_before_loading(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    # the model path does not exist: the output check has to come first
    assert main(["export", "--model", str(tmp_path / "no-model"), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user file"


def test_run_output_refusals_keep_the_users_files(tmp_path):
    from efx.cli.run import prepare_output
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="--resume to continue"):
        prepare_output(occupied, overwrite=False, resume=False)
    with pytest.raises(FileExistsError, match="no efx run to resume"):
        prepare_output(occupied, overwrite=True, resume=True)
    assert (occupied / "notes.txt").read_text() == "user file"
    a_file = tmp_path / "file.txt"
    a_file.write_text("user file")
    for overwrite, resume in ((False, False), (True, False), (False, True)):
        with pytest.raises(FileExistsError, match="is a file"):
            prepare_output(a_file, overwrite=overwrite, resume=resume)
    assert a_file.read_text() == "user file"
    prepare_output(occupied, overwrite=True, resume=False)
    assert occupied.is_dir() and not any(occupied.iterdir())


def test_summary_names_meaningless_retentions_and_smoke_runs():
    from efx.cli.main import _settings_from, build_parser, summary_line
    report = {"retention": {"overall": 0.9, "not_meaningful": ["icd_chapter"]}, "sparsity": {"overall": 0.4},
              "wall_seconds": 12.0, "settings": {"quick": True}}
    line = summary_line(report)
    assert "not meaningful" in line and "icd_chapter" in line and "smoke run" in line
    report["retention"]["not_meaningful"], report["settings"]["quick"] = [], False
    assert summary_line(report) == "overall retention 0.900, sparsity 0.4000, wall 12 s"
    settings = _settings_from(build_parser().parse_args(["run", "--quick", "--epochs", "3"]))
    assert settings.quick and settings.epochs == 3 and settings.eval_items == 50
    assert not _settings_from(build_parser().parse_args(["run"])).quick


def test_fsdp_settings_it_cannot_run_are_refused(monkeypatch):
    from efx.cli.run import RunSettings
    with pytest.raises(ValueError, match="distributed launch"):
        RunSettings(fsdp=True).validate()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    RunSettings(fsdp=True, device="cpu").validate()
    RunSettings(fsdp=True, device="cpu", method="dense").validate()
    for bad, message in (({"method": "wanda"}, "recorded during"), ({"statistics": "calibration"}, "recorded during")):
        with pytest.raises(ValueError, match=message):
            RunSettings(fsdp=True, device="cpu", **bad).validate()
