"""Statistics recorded from training forwards: they equal the calibration pass's statistics of
the same unpruned model and data, only training-mode forwards count, a pruning call can use them
with no forward pass of its own, and the callback option ends exactly sparse."""
import importlib

import pytest
import torch

from conftest import EXAMPLES, char_tokenizer, tiny_model
from efx.method.recorder import ActivationRecorder
from efx.model.arch import architecture_map, base_linear
from efx.method.statistics import calibrate
from efx.method.schedule import EfficientXpertCallback
from efx.recipes import calibration_batches, unload
from efx.method.prune import PruneConfig, prune
from efx.training import LoraSettings, TrainSettings, add_lora, train_lora
from test_calibration_and_prune import padded_calib

PRUNE_MODULE = importlib.import_module("efx.method.prune")  # `efx.method.prune` the attribute is the function


def lora_model(seed=0):
    model = add_lora(tiny_model("llama", seed=seed), LoraSettings(r=4, dropout=0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return model


def record(model, batches, train=True):
    recorder = ActivationRecorder(model)
    model.train(train)
    with torch.no_grad():
        for b in batches:
            model(**b)
    model.eval()
    return recorder


def test_recorded_statistics_equal_the_calibration_pass_without_pruning():
    model = lora_model()
    batches = padded_calib()
    recorder = record(model, batches)
    arch = architecture_map(model)
    seen = {}
    calibrate(model, arch, batches, lambda block, stats: seen.setdefault(block.index, stats))  # prunes nothing
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for block in arch.blocks:
        got = recorder.block_stats(block)
        assert set(got) == set(block.targets)
        for role, s in got.items():
            assert s.tokens == tokens and s.sequences == 6
            torch.testing.assert_close(s.act_sq, seen[block.index][role].act_sq, rtol=1e-5, atol=1e-7)
    recorder.remove()


def test_only_training_forwards_count_and_reset_and_remove():
    model = lora_model()
    recorder = record(model, padded_calib(), train=False)
    assert recorder.tokens == 0
    model.train()
    with torch.no_grad():
        model(**padded_calib()[0])
    assert recorder.tokens == int(padded_calib()[0]["attention_mask"].sum())
    recorder.reset()
    assert recorder.tokens == 0
    recorder.remove()
    with torch.no_grad():
        model(**padded_calib()[0])
    assert recorder.tokens == 0


def test_inactive_recorder_has_no_hooks_and_keeps_its_sums():
    model = lora_model()
    plain = {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}
    recorder = ActivationRecorder(model)
    model.train()
    batch = padded_calib()[0]
    with torch.no_grad():
        model(**batch)
    tokens = recorder.tokens
    recorder.active = False
    assert not recorder.active
    assert {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == plain
    with torch.no_grad():
        model(**batch)
    assert recorder.tokens == tokens
    recorder.active = True
    recorder.active = True  # attaching twice registers each hook once
    with torch.no_grad():
        model(**batch)
    assert recorder.tokens == 2 * tokens
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == sum(plain.values()) + len(recorder.sums) + \
        len(recorder._owners)
    recorder.remove()
    assert {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == plain


def test_recorder_tensors_are_allocated_when_attached_and_reset_in_place():
    """Training forwards and resets allocate no tensor the recorder keeps: the sums and the
    column-sum buffers exist from the start and keep their storage."""
    model = lora_model()
    recorder = ActivationRecorder(model)
    arch = architecture_map(model)
    names = {block.qualified(role) for block in arch.blocks for role in block.targets}
    assert set(recorder.sums) == names and recorder.tokens == 0
    kept = {name: s.sq_sum.data_ptr() for name, s in recorder.sums.items()}
    buffers = {key: t.data_ptr() for key, t in recorder._column_buffers.items()}
    model.train()
    with torch.no_grad():
        for b in padded_calib():
            model(**b)
    assert all(float(s.sq_sum.sum()) > 0 for s in recorder.sums.values())
    recorder.reset()
    assert recorder.tokens == 0 and all(s.sequences == 0 and not s.sq_sum.any() for s in recorder.sums.values())
    assert {name: s.sq_sum.data_ptr() for name, s in recorder.sums.items()} == kept
    assert {key: t.data_ptr() for key, t in recorder._column_buffers.items()} == buffers
    with pytest.raises(RuntimeError, match="saw no input"):
        recorder.block_stats(arch.blocks[0])
    recorder.remove()


def test_prune_from_recorded_statistics_runs_no_forward(monkeypatch):
    model = lora_model()
    recorder = record(model, padded_calib())
    reference = lora_model()
    expected = prune(reference, padded_calib(), PruneConfig(sparsity=0.5, targets=("q", "k", "v")))

    def no_forward(*args, **kwargs):
        raise AssertionError("a calibration pass ran")

    monkeypatch.setattr(PRUNE_MODULE, "calibrate", no_forward)
    report = prune(model, None, PruneConfig(sparsity=0.5, targets=("q", "k", "v")), recorded=recorder)
    assert report.sparsity == pytest.approx(0.5)
    # block 0 sees the same inputs either way (later blocks differ: the calibration pass feeds them
    # the pruned outputs of block 0), so its masks and weights are identical
    arch, ref_arch = architecture_map(model), architecture_map(reference)
    for role in ("q", "k", "v"):
        torch.testing.assert_close(base_linear(arch.blocks[0].targets[role]).weight,
                                   base_linear(ref_arch.blocks[0].targets[role]).weight, rtol=1e-5, atol=1e-6)
    assert expected.modules.keys() == report.modules.keys()
    recorder.remove()


def test_recorded_statistics_refuse_hessian_methods_and_empty_windows():
    model = lora_model()
    recorder = ActivationRecorder(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no training forward"):
        prune(model, None, PruneConfig(), recorded=recorder)
    for config in (PruneConfig(method="sparsegpt"), PruneConfig(pbs_hessian=True)):
        with pytest.raises(ValueError, match="Hessian"):
            prune(model, None, config, recorded=recorder)
        with pytest.raises(ValueError, match="Hessian"):
            EfficientXpertCallback(None, config, statistics="training")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="needs calibration data"):
        EfficientXpertCallback(None)
    with pytest.raises(ValueError, match="statistics 'weights'"):
        EfficientXpertCallback(None, statistics="weights")
    recorder.remove()


def test_callback_with_training_statistics_ends_exactly_sparse(monkeypatch):
    tok = char_tokenizer()
    model = tiny_model("llama", vocab_size=256)
    monkeypatch.setattr(PRUNE_MODULE, "calibrate", lambda *a, **k: pytest.fail("a calibration pass ran"))
    callback = EfficientXpertCallback(None, PruneConfig(sparsity=0.5), statistics="training")
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8, learning_rate=1e-2)
    model, _ = train_lora(model, tok, EXAMPLES, training=settings, callbacks=[callback])
    assert [c["when"] for c in callback.reports] == ["epoch 2 start", "epoch 3 start", "train end"]
    assert callback.recorder is None
    merged = unload(model)
    weights = [base_linear(m).weight for b in architecture_map(merged).blocks for m in b.targets.values()]
    assert sum(int((w == 0).sum()) for w in weights) == sum(w.numel() for w in weights) // 2
    assert not any(m._forward_pre_hooks for m in merged.modules())  # every hook removed


def test_gradient_checkpointing_keeps_the_recorded_mean():
    """Recomputed forwards in backward are counted too: sums and tokens both double, the mean stays."""
    batches = padded_calib()
    plain = record(lora_model(), batches)
    model = lora_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    recorder = ActivationRecorder(model)
    model.train()
    for b in batches:
        model(**b, labels=b["input_ids"]).loss.backward()
    model.eval()
    arch = architecture_map(model)
    assert recorder.tokens == 2 * plain.tokens  # every training forward seen twice
    for block in arch.blocks:
        ref = plain.block_stats(block)
        for role, s in recorder.block_stats(block).items():
            torch.testing.assert_close(s.act_sq, ref[role].act_sq, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", ["none", "right", "left", "scattered", "all"])
def test_reference_act_sq_equals_the_plain_sum(dtype, padding):
    """The torch path (the truth for the Triton kernel) against the plain sum of squares over the
    kept tokens, for the padding layouts a tokenizer produces and an integer mask."""
    import efx_kernels
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 11, 16, generator=gen).to(dtype)
    lengths = torch.tensor([11, 3, 7, 0])
    positions = torch.arange(11)[None, :]
    mask = {"none": None, "right": (positions < lengths[:, None]).long(),
            "left": (positions >= 11 - lengths[:, None]).long(),
            "scattered": (torch.rand(4, 11, generator=gen) > 0.5).long(),
            "all": torch.zeros(4, 11, dtype=torch.long)}[padding]
    rows = x.reshape(-1, 16).float()
    if mask is not None:
        rows = rows[mask.reshape(-1).bool()]
    want = torch.full((16,), 0.25) + (rows * rows).sum(0)
    got = torch.full((16,), 0.25)
    before = x.clone()
    assert efx_kernels.accumulate_act_sq(x, got, mask) == rows.shape[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, before)  # squared in a copy, never in the caller's tensor


@pytest.mark.parametrize("schedule, calib_sequences, sequences", [
    ("epoch", None, 16), ("epoch", 8, 8), ("epoch", 5, 8), ("epoch", 16, 16), ("steps", 8, 8), ("steps", None, 16)])
def test_training_statistics_record_the_last_steps_that_hold_the_calibration_size(monkeypatch, schedule,
                                                                                 calib_sequences, sequences):
    """16 examples, batch 8: two optimizer steps between calls under either schedule. Each call
    sees the sequences of the last steps before it that hold the calibration set's sequences
    (32 without one: both steps)."""
    import efx.method.schedule
    seen = []

    def counting_prune(model, calib, config, *, recorded=None, **kwargs):
        seen.append(max(s.sequences for s in recorded.sums.values()))
        return prune(model, calib, config, recorded=recorded, **kwargs)

    monkeypatch.setattr(efx.method.schedule, "prune", counting_prune)
    tok = char_tokenizer()
    calib = None if calib_sequences is None else calibration_batches(tok, EXAMPLES, n=calib_sequences, max_length=16)
    callback = EfficientXpertCallback(calib, PruneConfig(sparsity=0.5), statistics="training", schedule=schedule,
                                      every_steps=2 if schedule == "steps" else None)
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8, learning_rate=1e-2)
    train_lora(tiny_model("llama", vocab_size=256), tok, EXAMPLES, training=settings, callbacks=[callback])
    assert seen == [sequences] * 3
