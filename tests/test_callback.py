"""Pruning inside training: the epoch schedule ends merged and exactly sparse, the saved model
keeps its zeros, and two data-parallel ranks end with identical masks and weights."""
import json
import os
import subprocess
import sys

import pytest

from conftest import EXAMPLES, char_tokenizer, tiny_model
from efx.model.arch import architecture_map, base_linear
from efx.method.schedule import EfficientXpertCallback
from efx.recipes import calibration_batches, prune_and_adapt, unload
from efx.method.prune import PruneConfig
from efx.training import TrainSettings, train_lora



def target_sparsity(model):
    weights = [base_linear(m).weight for b in architecture_map(model).blocks for m in b.targets.values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("pattern, expected", [("unstructured", 0.5), ("2:4", 0.5)])
def test_epoch_schedule_ends_merged_and_exactly_sparse(tmp_path, pattern, expected):
    from transformers import AutoModelForCausalLM
    tok = char_tokenizer()
    model = tiny_model("llama", vocab_size=256)
    callback = EfficientXpertCallback(calibration_batches(tok, EXAMPLES, n=8),
                                      PruneConfig(sparsity=0.5, pattern=pattern))
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8, learning_rate=1e-2)
    model, _ = train_lora(model, tok, EXAMPLES, training=settings, callbacks=[callback])
    assert [c["when"] for c in callback.reports] == ["epoch 2 start", "epoch 3 start", "train end"]
    assert callback.reports[-1]["config"]["pbs"] is False and callback.reports[-1]["config"]["use_memory"] is False
    assert callback.reports[1]["mask_overlap"] is not None
    merged = unload(model)
    assert target_sparsity(merged) == pytest.approx(expected, abs=1e-9)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert target_sparsity(reloaded) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("reset", [True, False])
def test_reset_optimizer_clears_the_adam_state_at_each_call(reset):
    from transformers import TrainerCallback

    class StateAfterCall(TrainerCallback):  # runs after the EfficientXpert callback's call
        def __init__(self):
            self.states = []

        def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
            self.states.append(len(optimizer.state))

    tok = char_tokenizer()
    spy = StateAfterCall()
    callback = EfficientXpertCallback(calibration_batches(tok, EXAMPLES, n=8), PruneConfig(sparsity=0.5),
                                      reset_optimizer=reset)
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8, learning_rate=1e-2)
    train_lora(tiny_model("llama", vocab_size=256), tok, EXAMPLES, training=settings, callbacks=[callback, spy])
    assert spy.states[0] == 0  # nothing stepped yet
    adapter_params = 2 * 14  # A and B of every target
    assert spy.states[1:] == ([0, 0] if reset else [adapter_params, adapter_params])


def test_step_schedule_and_prune_and_adapt_pipelines():
    tok = char_tokenizer()
    settings = TrainSettings(epochs=2, n_examples=0, batch_size=4, learning_rate=1e-2)
    model, report = prune_and_adapt(tiny_model("llama", vocab_size=256), tok, EXAMPLES,
                                    prune=PruneConfig(sparsity=0.4), training=settings,
                                    callback_kwargs={"schedule": "steps", "every_steps": 3})
    assert [c["when"] for c in report["calls"]][:2] == ["step 3", "step 6"]
    weights = [base_linear(m).weight for b in architecture_map(model).blocks for m in b.targets.values()]
    exact = sum(w.shape[0] * (w.shape[1] * 2 // 5) for w in weights) / sum(w.numel() for w in weights)
    assert target_sparsity(model) == pytest.approx(exact, abs=1e-9)  # floor(n * 0.4) per row
    for pipeline in ("lora-prune", "prune-lora-reprune"):
        model, report = prune_and_adapt(tiny_model("llama", vocab_size=256), tok, EXAMPLES, pipeline=pipeline,
                                        prune=PruneConfig(method="wanda", sparsity=0.5), training=settings)
        assert target_sparsity(model) == pytest.approx(0.5, abs=1e-9)
        assert len(report["calls"]) == (1 if pipeline == "lora-prune" else 2)


def _carried_after_each_call(monkeypatch, callback, settings, tok) -> list:
    """Train a tiny model with `callback`; (score tensors, mask tensors) carried after each call."""
    import efx.method.schedule as callback_module
    real_prune = callback_module.prune
    left = []

    def counting_prune(*args, **kwargs):
        report = real_prune(*args, **kwargs)
        left.append((len(callback.memory.scores), len(callback.memory.masks)))
        return report

    monkeypatch.setattr(callback_module, "prune", counting_prune)
    train_lora(tiny_model("llama", vocab_size=256), tok, EXAMPLES, training=settings, callbacks=[callback])
    return left


@pytest.mark.parametrize("schedule", ["epoch", "steps"])
def test_each_call_carries_only_what_a_later_call_reads(monkeypatch, schedule):
    tok = char_tokenizer()
    steps = {"schedule": "steps", "every_steps": 3} if schedule == "steps" else {}  # steps: calls at 3 and 6 of 8
    callback = EfficientXpertCallback(calibration_batches(tok, EXAMPLES, n=8), PruneConfig(sparsity=0.5), **steps)
    settings = TrainSettings(epochs=3 if schedule == "epoch" else 2, n_examples=0, batch_size=4, learning_rate=1e-2)
    left = _carried_after_each_call(monkeypatch, callback, settings, tok)
    # the first call's scores feed the second; the second's would feed only the final call, which
    # blends no scores; its masks still give the final call's overlap, and the final call keeps nothing
    assert len(callback.reports) == 3 and left == [(14, 14), (0, 14), (0, 0)]
    assert callback.reports[-1]["mask_overlap"] is not None


def test_the_ramps_last_call_carries_no_scores(monkeypatch):
    """6 steps: ramp calls at steps 1..4 blend scores; the last of them carries only its masks
    (the final call blends no scores), and the final call keeps nothing."""
    tok = char_tokenizer()
    callback = EfficientXpertCallback(calibration_batches(tok, EXAMPLES, n=8), PruneConfig(sparsity=0.5),
                                      schedule="ramp", every_steps=1)
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8, learning_rate=1e-2)
    left = _carried_after_each_call(monkeypatch, callback, settings, tok)
    assert left == [(14, 14), (14, 14), (14, 14), (0, 14), (0, 0)]


def test_ramp_schedule_prunes_the_base_gradually_and_keeps_one_adapter(monkeypatch):
    """16 examples at batch 8 for 3 epochs: 6 steps, ramp calls at steps 1..4 (two thirds), at
    the cubic sparsities 0.5 * (1 - (1 - t/4)^3), each pruning the base alone; the adapter is
    never reset before the final call, which merges and ends at 0.5."""
    import efx.method.schedule as callback_module
    tok = char_tokenizer()
    callback = EfficientXpertCallback(calibration_batches(tok, EXAMPLES, n=8), PruneConfig(sparsity=0.5),
                                      schedule="ramp", every_steps=1)
    seen = []

    def observing_prune(model, calib, config, **kwargs):
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        seen.append((config.merge, any(bool(p.abs().sum()) for p in lora_b)))
        report = real_prune(model, calib, config, **kwargs)
        if not config.merge:  # the base holds the call's sparsity
            seen[-1] += (target_sparsity(model),)
        return report

    real_prune = callback_module.prune
    monkeypatch.setattr(callback_module, "prune", observing_prune)
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8, learning_rate=1e-2)
    model, _ = train_lora(tiny_model("llama", vocab_size=256), tok, EXAMPLES, training=settings, callbacks=[callback])
    assert [c["when"] for c in callback.reports] == ["step 1", "step 2", "step 3", "step 4", "train end"]
    want = [0.5 * (1 - (1 - t / 4) ** 3) for t in (1, 2, 3, 4)]
    assert [c["config"]["sparsity"] for c in callback.reports[:4]] == pytest.approx(want)
    for (merge, trained, sparsity), target in zip(seen[:4], want):
        assert merge is False and trained  # the adapter trained on since step 1: never reset
        assert sparsity == pytest.approx(target, abs=0.03)  # floor per row on 16- and 32-wide rows
    assert seen[-1][0] is True and callback.reports[-1]["config"]["pbs"] is False
    assert target_sparsity(unload(model)) == pytest.approx(0.5, abs=1e-9)


def is_two_four(weight) -> bool:
    """Every group of 4 consecutive inputs of every row holds at most 2 nonzeros."""
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def test_ramp_at_an_nm_pattern_cuts_the_base_once_and_keeps_the_adapter(monkeypatch):
    """At 2:4 the ramp is one cut: the first call (step 1) prunes the base alone to exactly 2:4 and
    rebuilds what it keeps, later steps call nothing, the adapter trains on; the final call merges
    and ends exactly 2:4."""
    import efx.method.schedule as callback_module
    tok = char_tokenizer()
    callback = EfficientXpertCallback(calibration_batches(tok, EXAMPLES, n=8),
                                      PruneConfig(pattern="2:4", reconstruct=True), schedule="ramp", every_steps=1)
    seen = []

    def observing_prune(model, calib, config, **kwargs):
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        trained = any(bool(p.abs().sum()) for p in lora_b)
        report = real_prune(model, calib, config, **kwargs)
        bases = [base_linear(m).weight for b in architecture_map(model).blocks for m in b.targets.values()]
        seen.append((config.merge, trained, all(is_two_four(w) for w in bases)))
        return report

    real_prune = callback_module.prune
    monkeypatch.setattr(callback_module, "prune", observing_prune)
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8, learning_rate=1e-2)
    model, _ = train_lora(tiny_model("llama", vocab_size=256), tok, EXAMPLES, training=settings, callbacks=[callback])
    assert [c["when"] for c in callback.reports] == ["step 1", "train end"]
    assert seen[0] == (False, True, True)  # the base alone, cut to 2:4 after one step of training
    assert seen[1][:2] == (True, True)  # the final call merges an adapter trained since the cut
    assert all(c["config"]["reconstruct"] for c in callback.reports)
    merged = unload(model)
    weights = [base_linear(m).weight for b in architecture_map(merged).blocks for m in b.targets.values()]
    assert all(is_two_four(w) for w in weights)
    assert target_sparsity(merged) == pytest.approx(0.5, abs=1e-9)


def test_ramp_spreads_four_calls_over_two_thirds_of_training_when_no_interval_is_given():
    from types import SimpleNamespace
    callback = EfficientXpertCallback([{"input_ids": [[0]]}], schedule="ramp")
    for max_steps, every in ((60, 10), (300, 50), (8, 1), (2, 1)):  # one callback, trainings of other lengths
        callback.on_train_begin(None, SimpleNamespace(max_steps=max_steps), None)
        assert callback.interval == every and callback.every_steps is None
    callback = EfficientXpertCallback([{"input_ids": [[0]]}], schedule="ramp", every_steps=7)
    callback.on_train_begin(None, SimpleNamespace(max_steps=60), None)
    assert callback.interval == 7


def test_bad_schedule():
    with pytest.raises(ValueError, match="every_steps"):
        EfficientXpertCallback([], schedule="steps")
    with pytest.raises(ValueError, match="every_steps 0 must be positive"):
        EfficientXpertCallback([{}], schedule="ramp", every_steps=0)
    with pytest.raises(ValueError, match="the ramp's calls keep the adapter"):
        EfficientXpertCallback([{}], schedule="ramp", reset_optimizer=True)
    with pytest.raises(ValueError, match="schedule"):
        EfficientXpertCallback([], schedule="cubic")


@pytest.mark.ddp
@pytest.mark.parametrize("statistics", ["calibration", "training"])
def test_two_process_ddp_gives_identical_masks(tmp_path, statistics):
    env = dict(os.environ, OMP_NUM_THREADS="1", EFX_KERNELS="torch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(os.path.dirname(__file__), "ddp_worker.py"), str(tmp_path), statistics]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["calls"] == 3 for r in ranks)
    assert ranks[0]["zeros"] > 0
    assert ranks[0]["digest"] == ranks[1]["digest"]
