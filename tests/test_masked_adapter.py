"""Masked adapter between pruning calls: the delta's gradients, the forward it replaces, and a
schedule whose final call loses nothing because training never left the mask."""
import pytest
import torch

from conftest import EXAMPLES, char_tokenizer, tiny_model
from efx.method import masked_adapter
from efx.model.arch import architecture_map, base_linear, lora_parts
from efx.method.schedule import EfficientXpertCallback
from efx.recipes import calibration_batches, unload
from efx.method.prune import PruneConfig
from efx.method.score_memory import pack_mask, unpack_mask
from efx.training import LoraSettings, TrainSettings, add_lora, train_lora



def test_masked_delta_gradients_match_autograd():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(7, 12, generator=gen) > 0.4
    assert torch.autograd.gradcheck(lambda x, A, B: masked_delta_ref(x, A, B, mask, 0.7), (x, A, B))
    assert torch.autograd.gradcheck(lambda x, A, B: masked_adapter.masked_delta(x, A, B, mask, 0.7), (x, A, B))
    out = masked_adapter.masked_delta(x, A, B, mask, 0.7)
    torch.testing.assert_close(out, masked_delta_ref(x, A, B, mask, 0.7))


def masked_delta_ref(x, A, B, mask, scale):
    return x @ (mask.to(A.dtype) * (scale * B @ A)).T


def random_masks(arch, sparsity=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for block in arch.blocks:
        for role, module in block.targets.items():
            keep = torch.rand(base_linear(module).weight.shape, generator=gen) >= sparsity
            masks[block.qualified(role)] = pack_mask(keep)
    return masks


def test_attach_and_fold_compute_the_masked_effective_weight():
    model = add_lora(tiny_model("llama"), LoraSettings(r=4, dropout=0.0), seed=0)
    arch = architecture_map(model)
    with torch.no_grad():
        for block in arch.blocks:
            for module in block.targets.values():
                lora_parts(module)[1].normal_()  # a nonzero B
    ids = torch.randint(0, 96, (2, 9))
    masks = random_masks(arch)
    assert masked_adapter.attach(arch, masks) == 2 * 7
    with torch.no_grad():
        attached = model(input_ids=ids).logits
    reference = tiny_model("llama")
    ref_arch = architecture_map(reference)
    with torch.no_grad():
        for block, ref_block in zip(arch.blocks, ref_arch.blocks):
            for role, module in block.targets.items():
                A, B, scale = lora_parts(module)
                keep = unpack_mask(masks[block.qualified(role)], (B.shape[0], A.shape[1]))
                base_linear(ref_block.targets[role]).weight.add_(keep * (scale * B @ A))
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(attached, expected, rtol=1e-5, atol=1e-5)
    masked_adapter.fold(arch)
    assert all(not hasattr(m, "_efx_mask") and "forward" not in vars(m)
               for b in arch.blocks for m in b.targets.values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_keeps_the_mask_and_the_final_call_loses_nothing():
    tok = char_tokenizer()
    callback = EfficientXpertCallback(calibration_batches(tok, EXAMPLES, n=8), PruneConfig(sparsity=0.5),
                                      masked_adapter=True)
    logits_before_final = {}
    ids = torch.randint(2, 96, (2, 7))

    class Probe(EfficientXpertCallback.__mro__[1]):  # a plain TrainerCallback that runs before the final call
        def on_train_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                model.eval()
                logits_before_final["x"] = model(input_ids=ids).logits.clone()

    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8, learning_rate=1e-2)
    model, _ = train_lora(tiny_model("llama", vocab_size=256), tok, EXAMPLES, training=settings,
                          callbacks=[Probe(), callback])
    # The final call only finds the zeros that training under the mask left (it may re-pick
    # entries inside rows whose consumer column is all zero, which no output reads), so the
    # model computes the same function before and after it.
    assert callback.reports[-1]["mask_overlap"] > 0.98
    merged = unload(model)
    with torch.no_grad():
        final = merged(input_ids=ids).logits
    torch.testing.assert_close(final, logits_before_final["x"], rtol=1e-4, atol=1e-5)
    weights = [base_linear(m).weight for b in architecture_map(merged).blocks for m in b.targets.values()]
    assert callback.reports[-1]["sparsity"] == 0.5
    assert sum(int((w == 0).sum()) for w in weights) >= 0.5 * sum(w.numel() for w in weights)
