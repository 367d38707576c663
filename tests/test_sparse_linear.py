"""SparseLoRALinear in a model: same logits as the masked dense model, training touches only
A and B, merge keeps exact sparsity, and checkpoints round-trip."""
import pytest
import torch

from conftest import tiny_model
from efx.model.arch import architecture_map, base_linear
from efx.model.checkpoint import load_sparse, save_sparse
from efx.method.prune import PruneConfig, prune
from efx.model.sparse_linear import SparseLoRALinear, merge_all, to_dense, to_sparse_lora
from efx.training import LoraSettings, add_lora


def pruned_model(pattern="unstructured", seed=0):
    model = tiny_model("llama", seed=seed, hidden_size=64, intermediate_size=128)
    prune(model, torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0)),
          PruneConfig(method="wanda", sparsity=0.5, pattern=pattern))
    return model


@pytest.mark.parametrize("fmt, pattern", [("bitmap", "unstructured"), ("2:4", "2:4"), ("masked", "unstructured")])
def test_same_logits_as_the_masked_dense_model(fmt, pattern):
    model = pruned_model(pattern)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    to_sparse_lora(model, format=fmt, rank=4)
    assert sum(isinstance(m, SparseLoRALinear) for m in model.modules()) == 14
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # B = 0: the adapter adds nothing yet


def test_training_step_changes_only_the_adapter_and_merge_keeps_sparsity():
    model = pruned_model()
    to_sparse_lora(model, format="bitmap", rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 28
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 96, (2, 10))
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_A" in k or "lora_B" in k for k in changed)
    masks = {n: m.keep_mask().clone() for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}
    merge_all(model)
    for name, module in model.named_modules():
        if isinstance(module, SparseLoRALinear):
            dense = module.dense_weight()
            assert torch.equal(dense != 0, masks[name] & (dense != 0))
            assert int((dense == 0).sum()) >= int((~masks[name]).sum())
            assert module.lora_B.abs().sum() == 0


def test_from_peft_lora_layer_keeps_the_adapter():
    model = add_lora(pruned_model(), LoraSettings(r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    to_sparse_lora(model, format="bitmap")
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_and_dense_export(tmp_path):
    from transformers import AutoModelForCausalLM
    model = pruned_model()
    to_sparse_lora(model, format="bitmap", rank=4)
    for m in model.modules():
        if isinstance(m, SparseLoRALinear):
            m.lora_B.data.normal_(0, 0.05)
    ids = torch.randint(0, 96, (2, 10))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    save_sparse(model, tmp_path / "packed")
    loaded, _ = load_sparse(tmp_path / "packed")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
    with pytest.raises(FileExistsError):
        save_sparse(model, tmp_path / "packed")
    to_dense(loaded)  # the mask-preserving merge drops s*B@A on pruned positions: logits move
    with torch.no_grad():
        merged = loaded(ids).logits
    loaded.save_pretrained(tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, merged)
    for block in architecture_map(plain).blocks:
        w = base_linear(block.targets["up"]).weight
        assert (w == 0).float().mean() >= 0.5


def test_export_packs_2_4_where_the_zeros_allow_it_and_bitmap_elsewhere(tmp_path):
    from conftest import char_tokenizer
    from efx.cli.export import export
    from efx.model.sparse_linear import packed_format
    for pattern, want in (("2:4", "2:4"), ("unstructured", "bitmap")):
        model = pruned_model(pattern)
        assert packed_format(model) == want
        model.save_pretrained(tmp_path / pattern)
        char_tokenizer().save_pretrained(tmp_path / pattern)
        export(str(tmp_path / pattern), str(tmp_path / f"out-{want}"))
        loaded, _ = load_sparse(tmp_path / f"out-{want}" / "packed")
        assert {m.packed.format for m in loaded.modules() if isinstance(m, SparseLoRALinear)} == {want}
    with pytest.raises(ValueError, match="--format 'dense': expected auto or one of"):
        export(str(tmp_path / "2:4"), str(tmp_path / "out-bad"), fmt="dense")
    assert not (tmp_path / "out-bad").exists()


def test_bad_masks_leave_the_model_untouched():
    model = pruned_model()
    with pytest.raises(ValueError, match="2:4"):
        to_sparse_lora(model, format="2:4")
    assert not any(isinstance(m, SparseLoRALinear) for m in model.modules())


def test_a_version_1_two_four_checkpoint_loads_with_the_same_logits(tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    from efx.model.checkpoint import MANIFEST, WEIGHTS
    model = pruned_model("2:4")
    to_sparse_lora(model, format="2:4", rank=0)
    ids = torch.randint(0, 96, (2, 10))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    save_sparse(model, tmp_path / "v2")
    # rewrite it as v1 stored it: positions in int32 words of eight groups (its values, (m, n/2),
    # are v4's at these widths, multiples of 64)
    tensors = load_file(str(tmp_path / "v2" / WEIGHTS))
    for key in [k for k in tensors if k.endswith("meta")]:
        tensors[key] = tensors[key].view(torch.int32).contiguous()
    save_file(tensors, str(tmp_path / "v2" / WEIGHTS), metadata={"format": "pt"})
    manifest = json.loads((tmp_path / "v2" / MANIFEST).read_text())
    manifest["format_version"] = 1
    for cfg in manifest["modules"].values():
        cfg["version"] = 1
    (tmp_path / "v2" / MANIFEST).write_text(json.dumps(manifest))
    loaded, _ = load_sparse(tmp_path / "v2")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
    from efx_kernels.formats import FORMAT_VERSION
    assert all(m.packed.version == FORMAT_VERSION and m.packed.tensors["meta"].dtype == torch.int64
               for m in loaded.modules() if isinstance(m, SparseLoRALinear))


def test_a_version_2_bitmap_checkpoint_loads_with_the_same_logits(tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    from efx.model.checkpoint import MANIFEST, WEIGHTS
    from efx.model.sparse_linear import BUFFER_PREFIX
    from efx_kernels.formats import FORMAT_VERSION
    from test_formats import v2_bitmap
    model = pruned_model()
    to_sparse_lora(model, format="bitmap", rank=0)
    ids = torch.randint(0, 96, (2, 10))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    folder = save_sparse(model, tmp_path / "ckpt")
    # rewrite every packed weight as v2 stored it: 16 x 64 tiles, int32 words, one offset per tile
    tensors = load_file(str(folder / WEIGHTS))
    for name, module in model.named_modules():
        if isinstance(module, SparseLoRALinear):
            old = v2_bitmap(module.packed.unpack(), module.packed.keep_mask())
            for key, value in old.tensors.items():
                tensors[f"{name}.{BUFFER_PREFIX}{key}"] = value
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["format_version"] = 2
    for cfg in manifest["modules"].values():
        cfg["version"] = 2
    (folder / MANIFEST).write_text(json.dumps(manifest))
    loaded, _ = load_sparse(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
    assert all(m.packed.version == FORMAT_VERSION and m.packed.tensors["bitmap"].dtype == torch.int64
               for m in loaded.modules() if isinstance(m, SparseLoRALinear))
