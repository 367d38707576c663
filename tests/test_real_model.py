"""On the embedded SmolLM2-135M-Instruct (select with -m real_model)."""
import copy

import pytest
import torch

from efx.model.arch import architecture_map
from efx.evaluation.evaluate import evaluate, perplexity
from efx.method.prune import PruneConfig, prune
from efx.model.sparse_linear import SparseLoRALinear, to_sparse_lora

pytestmark = pytest.mark.real_model
TEXTS = ["Abnormal morphology of the hyoid bone, a small U-shaped bone in the neck.",
         "Permission is hereby granted, free of charge, to any person obtaining a copy of this software."]


def test_embedded_model_and_its_architecture(embedded):
    model, tok = embedded
    arch = architecture_map(model)
    assert (len(arch.blocks), arch.num_heads, arch.num_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert tok.chat_template and tok.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) > 130e6


@pytest.fixture(scope="module")
def pruned(embedded):
    model, tok = embedded
    model = copy.deepcopy(model)
    calib = tok(TEXTS * 2, return_tensors="pt", padding=True)
    prune(model, [dict(calib)], PruneConfig(method="wanda", sparsity=0.5, pattern="2:4"))
    return model, tok


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_sparse_lora_model_matches_the_masked_dense_model(pruned, fmt):
    model, tok = pruned
    ids = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**ids).logits
    want_ppl = perplexity(model, tok, TEXTS)["perplexity"]
    sparse = to_sparse_lora(copy.deepcopy(model), format=fmt, rank=8)
    with torch.no_grad():
        got = sparse(**ids).logits
    assert (got - want).abs().max().item() < 1e-3
    assert perplexity(sparse, tok, TEXTS)["perplexity"] == pytest.approx(want_ppl, rel=1e-4)


def test_training_through_sparse_lora_linear_on_the_embedded_model(pruned):
    model, tok = pruned
    sparse = to_sparse_lora(copy.deepcopy(model), format="bitmap", rank=8)
    sparse.train()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    params = [p for p in sparse.parameters() if p.requires_grad]
    before = [p.clone() for p in params]
    loss = sparse(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    torch.optim.AdamW(params, lr=1e-3).step()
    assert torch.isfinite(loss)
    assert all(isinstance(m, SparseLoRALinear) for b in architecture_map(sparse).blocks for m in b.targets.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_evaluate_smoke(embedded):
    from efx.data.suites import load_suite
    model, tok = embedded
    result = evaluate(model, tok, load_suite("legal"), max_items=8, ppl=False)
    assert set(result["tasks"]) == {"license_category", "notice_license"}
    assert all(0 <= t["accuracy"] <= 1 for t in result["tasks"].values())
