"""What makes efx fit a real model: bf16 end to end, and a pruning call whose extra memory does
not grow with depth."""
import gc

import pytest
import torch

from conftest import EXAMPLES, char_tokenizer, tiny_model
from efx.cli.export import export
from efx.measure import heap_in_use_bytes
from efx.method import prune as prune_module
from efx.method.prune import PruneConfig, prune
from efx.model.arch import architecture_map, base_linear
from efx.model.checkpoint import load_sparse
from efx.model.loading import load_model
from efx.recipes import calibration_batches, prune_and_adapt
from efx.training import LoraSettings, TrainSettings, add_lora


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_bf16_end_to_end_train_prune_export_reload(tmp_path):
    """A bf16 model trains (LoRA factors in fp32), is pruned inside training, saved and exported in
    bf16, and every reload gives the logits of the model in memory, with +0.0 zeros only."""
    tok = char_tokenizer()
    tiny_model("llama", vocab_size=256).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = load_model(tmp_path / "base", dtype="bfloat16")
    settings = TrainSettings(epochs=2, n_examples=0, batch_size=8, learning_rate=1e-2, max_length=32)
    calib = calibration_batches(tok, EXAMPLES, n=8)
    expert, report = prune_and_adapt(model, tok, EXAMPLES, prune=PruneConfig(sparsity=0.5), training=settings,
                                     lora=LoraSettings(r=4), calib=calib)
    assert all(p.dtype == torch.bfloat16 for p in expert.parameters())
    assert report["calls"][-1]["sparsity"] == pytest.approx(0.5)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    want = logits(expert, ids)
    expert.save_pretrained(tmp_path / "expert")
    tok.save_pretrained(tmp_path / "expert")
    reloaded, _ = load_model(tmp_path / "expert")  # the dtype it was saved in
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded, ids), want)
    audit = export(str(tmp_path / "expert"), str(tmp_path / "out"))
    assert audit["negative_zeros"] == 0 and audit["overall"] == pytest.approx(0.5)
    assert {m["dtype"] for m in audit["modules"].values()} == {"bfloat16"}
    hf, _ = load_model(tmp_path / "out" / "hf")
    assert hf.dtype == torch.bfloat16 and torch.equal(logits(hf, ids), want)
    packed, _ = load_sparse(tmp_path / "out" / "packed")
    torch.testing.assert_close(logits(packed, ids), want, rtol=0, atol=0)


def held_memory_of_a_call(layers: int, monkeypatch) -> int:
    """Bytes in use (malloc) held after each target of one call, beyond what was held before it: the
    peak over targets. What one target's pruning allocates and frees again is not counted; what a
    call keeps until it ends (an undo copy, say) is."""
    model = add_lora(tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2), LoraSettings(r=8)).eval()
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    held = []
    real = prune_module._prune_module

    def spy(*args, **kwargs):
        real(*args, **kwargs)
        gc.collect()
        held.append(heap_in_use_bytes())

    monkeypatch.setattr(prune_module, "_prune_module", spy)
    gc.collect()
    before = heap_in_use_bytes()
    prune(model, calib, PruneConfig(sparsity=0.5))
    return max(held) - before


@pytest.mark.skipif(heap_in_use_bytes() is None, reason="needs glibc's mallinfo2")
def test_a_calls_extra_memory_does_not_grow_with_depth(monkeypatch):
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    block = architecture_map(model).blocks[0]
    layer_bytes = sum(base_linear(m).weight.numel() * 4 for m in block.targets.values())  # fp32, 2.4 MB
    shallow, deep = held_memory_of_a_call(2, monkeypatch), held_memory_of_a_call(6, monkeypatch)
    growth_per_layer = (deep - shallow) / 4
    assert growth_per_layer <= 0.25 * layer_bytes, (shallow, deep, layer_bytes)
