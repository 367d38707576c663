"""ForeSight factors, scores and exact mask selection."""
import math

import pytest
import torch

from conftest import tiny_model
from efx.model.arch import architecture_map, module_weight
from efx.method.foresight import propagation_factors, select_keep_mask
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
    Uq = module_weight(block.targets["q"], scaled=False)
    Uk = module_weight(block.targets["k"], scaled=False)
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
    U = {r: module_weight(block.targets[r], scaled=False) for r in ("o", "gate", "up", "down")}
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
    U = {r: module_weight(block.targets[r]) for r in ("q", "k", "o", "gate", "up", "down")}
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
    fup = propagation_factors(arch, block, "up", "efx").row
    for i in range(U["gate"].shape[1]):  # output i of o feeds column i of gate and up; output i of up, column i of down
        reads = sum(U[r][row, i].item() ** 2 for r in ("gate", "up") for row in range(U[r].shape[0]))
        assert fo[i].item() == pytest.approx(math.sqrt(reads), rel=1e-5)
    for i in range(U["down"].shape[1]):
        reads = sum(U["down"][row, i].item() ** 2 for row in range(U["down"].shape[0]))
        assert fup[i].item() == pytest.approx(math.sqrt(reads), rel=1e-5)


def pruned_by_hand(values: list[float], k: int) -> set[int]:
    """The k lowest values; among equal values the higher index goes first (the lower is kept)."""
    return set(sorted(range(len(values)), key=lambda j: (values[j], -j))[:k])


def kept_by_hand(score: torch.Tensor, k: int, granularity: str) -> torch.Tensor:
    """The selection rule written out element by element, independent of the code under test."""
    rows = score.tolist() if granularity == "row" else [score.reshape(-1).tolist()]
    keep = [[j not in pruned_by_hand(row, k) for j in range(len(row))] for row in rows]
    return torch.tensor(keep).reshape(score.shape)


@pytest.mark.parametrize("granularity", ["row", "matrix"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_selection_matches_the_rule_by_hand(granularity, sparsity):
    score = torch.rand(13, 37, generator=torch.Generator().manual_seed(0))
    k = math.floor(37 * sparsity) if granularity == "row" else math.floor(13 * 37 * sparsity)
    keep = select_keep_mask(score, sparsity, "unstructured", granularity)
    assert torch.equal(keep, kept_by_hand(score, k, granularity))


@pytest.mark.parametrize("offset", [0.0, -1.5])
@pytest.mark.parametrize("granularity", ["row", "matrix"])
@pytest.mark.parametrize("sparsity", [0.4, 0.7])  # the k-th smallest from the low side and from the high side
def test_ties_keep_the_lower_column(granularity, offset, sparsity):
    score = torch.randint(0, 4, (9, 24), generator=torch.Generator().manual_seed(1)).float() + offset
    score[2] = 0.0
    k = math.floor(24 * sparsity) if granularity == "row" else math.floor(9 * 24 * sparsity)
    keep = select_keep_mask(score, sparsity, "unstructured", granularity)
    assert torch.equal(keep, kept_by_hand(score, k, granularity))
    if granularity == "row":  # a row of equal scores keeps its first columns
        assert keep[2, :24 - k].all() and not keep[2, 24 - k:].any()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("ties", [False, True])
def test_nm_selection_keeps_the_top_n_of_each_group(pattern, ties):
    n, m = map(int, pattern.split(":"))
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 3, (6, 32), generator=gen).float() if ties else torch.rand(6, 32, generator=gen)
    keep = select_keep_mask(score, 0.0, pattern)
    for i in range(6):
        for start in range(0, 32, m):
            group = score[i, start:start + m].tolist()
            want = sorted(range(m), key=lambda j: (-group[j], j))[:n]  # highest first; ties: lower column
            assert keep[i, start:start + m].nonzero().flatten().tolist() == sorted(want)


@pytest.mark.parametrize("n, sparsity, pruned", [(100, 0.29, 29), (100, 0.57, 57), (10, 0.3, 3), (7, 0.5, 3),
                                                 (1000, 0.001, 1)])
def test_pruned_count_is_the_floor_of_the_decimal(n, sparsity, pruned):
    """floor(100 * 0.29) is 28 in binary floating point; the count the user asked for is 29."""
    score = torch.rand(2, n, generator=torch.Generator().manual_seed(0))
    assert int((~select_keep_mask(score, sparsity)).sum(1)[0]) == pruned


def test_bad_pattern_and_granularity():
    with pytest.raises(ValueError, match="N:M"):
        select_keep_mask(torch.rand(4, 8), 0.5, "4:2")
    with pytest.raises(ValueError, match="divisible"):
        select_keep_mask(torch.rand(4, 10), 0.5, "2:4")
    with pytest.raises(ValueError, match="granularity"):
        select_keep_mask(torch.rand(4, 8), 0.5, "unstructured", "column")
