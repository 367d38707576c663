"""ForeSight factors, scores and exact mask selection."""
import math

import pytest
import torch

from conftest import tiny_model
from efx.arch import architecture_map, effective_weight
from efx.foresight import propagation_factors, select_keep_mask
from efx.training import LoraSettings, add_lora


@pytest.fixture
def gqa_block():
    model = add_lora(tiny_model("llama", num_attention_heads=4, num_key_value_heads=2), LoraSettings(r=4))
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
    arch = architecture_map(model)
    return arch, arch.blocks[0]


def test_paper_q_and_k_factors_by_hand(gqa_block):
    arch, block = gqa_block
    d, G = arch.head_dim, arch.group_size
    Uq = effective_weight(block.targets["q"], scaled=False)
    Uk = effective_weight(block.targets["k"], scaled=False)
    fq = propagation_factors(arch, block, "q", "paper").col
    fk = propagation_factors(arch, block, "k", "paper").col
    n = Uq.shape[1]
    for h in range(arch.num_heads):
        g = h // G
        for j in range(n):
            want = math.sqrt(sum(float(Uk[g * d + e, j]) ** 2 for e in range(d)))
            assert fq[h, j].item() == pytest.approx(want, rel=1e-5)
    for g in range(arch.num_kv_heads):
        for j in range(n):
            per_head = [sum(float(Uq[h * d + e, j]) ** 2 for e in range(d)) for h in range(g * G, (g + 1) * G)]
            assert fk[g, j].item() == pytest.approx(math.sqrt(sum(per_head) / G), rel=1e-5)


def test_paper_v_o_gate_up_factors_by_hand(gqa_block):
    arch, block = gqa_block
    d, G = arch.head_dim, arch.group_size
    U = {r: effective_weight(block.targets[r], scaled=False) for r in ("o", "gate", "up", "down")}
    fv = propagation_factors(arch, block, "v", "paper").row
    for g in range(arch.num_kv_heads):
        for e in range(d):
            cols = [U["o"][:, h * d + e].norm().item() ** 2 for h in range(g * G, (g + 1) * G)]
            assert fv[g * d + e].item() == pytest.approx(math.sqrt(sum(cols) / G), rel=1e-5)
    fo = propagation_factors(arch, block, "o", "paper").row
    for i in range(fo.shape[0]):
        want = (U["gate"][:, i].norm() + U["up"][:, i].norm()).item() / 2
        assert fo[i].item() == pytest.approx(want, rel=1e-5)
    fgate = propagation_factors(arch, block, "gate", "paper").col
    for j in range(fgate.shape[0]):
        assert fgate[j].item() == pytest.approx(U["down"][j, :].norm().item(), rel=1e-5)
    assert propagation_factors(arch, block, "down", "paper").row is None


def test_efx_factors_by_hand(gqa_block):
    arch, block = gqa_block
    d, G = arch.head_dim, arch.group_size
    U = {r: effective_weight(block.targets[r]) for r in ("q", "k", "o", "gate", "up", "down")}
    fq = propagation_factors(arch, block, "q", "efx").row
    fk = propagation_factors(arch, block, "k", "efx").row
    fv = propagation_factors(arch, block, "v", "efx").row
    for h in range(arch.num_heads):
        for e in range(d):
            assert fq[h * d + e].item() == pytest.approx(U["k"][(h // G) * d + e].norm().item(), rel=1e-5)
    for g in range(arch.num_kv_heads):
        for e in range(d):
            rows = [U["q"][h * d + e].norm().item() ** 2 for h in range(g * G, (g + 1) * G)]
            assert fk[g * d + e].item() == pytest.approx(math.sqrt(sum(rows)), rel=1e-5)
            cols = [U["o"][:, h * d + e].norm().item() ** 2 for h in range(g * G, (g + 1) * G)]
            assert fv[g * d + e].item() == pytest.approx(math.sqrt(sum(cols)), rel=1e-5)
    fo = propagation_factors(arch, block, "o", "efx").row
    want = (U["gate"].pow(2).sum(0) + U["up"].pow(2).sum(0)).sqrt()
    torch.testing.assert_close(fo, want)
    torch.testing.assert_close(propagation_factors(arch, block, "up", "efx").row, U["down"].norm(dim=0))


@pytest.mark.parametrize("granularity", ["row", "matrix"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_selection_is_exact(granularity, sparsity):
    score = torch.rand(13, 37, generator=torch.Generator().manual_seed(0))
    keep = select_keep_mask(score, sparsity, "unstructured", granularity)
    if granularity == "row":
        assert ((~keep).sum(1) == math.floor(37 * sparsity)).all()
    else:
        assert int((~keep).sum()) == math.floor(13 * 37 * sparsity)
    # every pruned score is <= every kept score in its row (row) or matrix
    if 0 < sparsity:
        if granularity == "row":
            assert (torch.where(~keep, score, -1).amax(1) <= torch.where(keep, score, 2).amin(1)).all()
        else:
            assert score[~keep].max() <= score[keep].min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_selection_is_exact(pattern):
    n, m = map(int, pattern.split(":"))
    score = torch.rand(6, 32, generator=torch.Generator().manual_seed(0))
    keep = select_keep_mask(score, 0.0, pattern)
    assert (keep.reshape(6, -1, m).sum(-1) == n).all()


def test_ties_are_deterministic():
    score = torch.ones(4, 8)
    keep = select_keep_mask(score, 0.5, "unstructured", "row")
    assert keep[:, 4:].all() and not keep[:, :4].any()
    assert torch.equal(select_keep_mask(score, 0.0, "2:4"), select_keep_mask(score.clone(), 0.0, "2:4"))


@pytest.mark.parametrize("offset", [0.0, -1.5])  # non-negative scores rank by bit pattern, signed ones by value
@pytest.mark.parametrize("granularity", ["row", "matrix"])
@pytest.mark.parametrize("sparsity", [0.4, 0.7])  # the k-th smallest from the low side and from the high side
def test_selection_with_many_ties_matches_a_stable_sort(granularity, offset, sparsity):
    score = torch.randint(0, 4, (9, 24), generator=torch.Generator().manual_seed(1)).float() + offset
    score[2] = 0.0
    flat = score if granularity == "row" else score.reshape(1, -1)
    k = math.floor(flat.shape[1] * sparsity)
    expected = torch.ones_like(flat, dtype=torch.bool)
    expected.scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :k], False)
    keep = select_keep_mask(score, sparsity, "unstructured", granularity)
    assert torch.equal(keep, expected.reshape(score.shape))


def test_bad_pattern_and_granularity():
    with pytest.raises(ValueError, match="N:M"):
        select_keep_mask(torch.rand(4, 8), 0.5, "4:2")
    with pytest.raises(ValueError, match="divisible"):
        select_keep_mask(torch.rand(4, 10), 0.5, "2:4")
    with pytest.raises(ValueError, match="granularity"):
        select_keep_mask(torch.rand(4, 8), 0.5, "unstructured", "column")
