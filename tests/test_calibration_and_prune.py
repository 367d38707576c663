"""The sequential calibration pass, one pruning call end to end, and its guarantees."""
import math
import tempfile

import pytest
import torch

from conftest import tiny_model
from efx.model.arch import architecture_map, base_linear
from efx.method.baselines import sparsegpt, wanda_score
from efx.method.statistics import calibrate
from efx.method.foresight import select_keep_mask
from efx.method.prune import PruneConfig, PruneMemory, prune
from efx.method.score_memory import mask_overlap, pack_mask, unpack_mask
from efx.method.score_memory import CarriedTensors
from efx.training import LoraSettings, add_lora


def lora_model(seed=0, family="llama"):
    model = add_lora(tiny_model(family, seed=seed), LoraSettings(r=4))
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return model.eval()


def padded_calib():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (6, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[3, 2:] = 0
    return [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]


def test_statistics_match_a_plain_forward_of_the_pruned_model():
    """Every block's statistics are those of its inputs after the earlier blocks were pruned
    (and before the block itself is), with padding excluded. In the final pruned model the
    block-entry targets q, k, v see exactly those inputs."""
    model = lora_model()
    arch = architecture_map(model)
    seen = {}

    def on_block(block, stats):
        seen[block.index] = {role: s.act_sq.clone() for role, s in stats.items()}
        for module in block.targets.values():  # prune something, so propagation matters
            w = base_linear(module).weight
            w.data[:, ::2] = 0

    batches = padded_calib()
    calibrate(model, arch, batches, on_block)
    captured = {}
    hooks = []
    for block in arch.blocks:
        for role, module in block.targets.items():
            def hook(mod, args, key=(block.index, role)):
                captured.setdefault(key, []).append(args[0].detach())
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    mask = torch.cat([b["attention_mask"] for b in batches]).bool()
    for (index, role), xs in captured.items():
        if role not in ("q", "k", "v"):
            continue
        x = torch.cat(xs)[mask]
        torch.testing.assert_close(seen[index][role], x.pow(2).mean(0), rtol=1e-4, atol=1e-6)


def test_first_block_statistics_match_the_unpruned_forward():
    model = lora_model()
    arch = architecture_map(model)
    seen = {}
    calibrate(model, arch, padded_calib(), lambda block, stats: seen.setdefault(block.index, stats))
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, r=role: captured.setdefault(r, []).append(a[0]))
             for role, m in arch.blocks[0].targets.items()]
    with torch.no_grad():
        for b in padded_calib():
            model(**b)
    for h in hooks:
        h.remove()
    mask = torch.cat([b["attention_mask"] for b in padded_calib()]).bool()
    for role, xs in captured.items():
        x = torch.cat(xs)[mask]
        torch.testing.assert_close(seen[0][role].act_sq, x.pow(2).mean(0), rtol=1e-4, atol=1e-6)
        assert seen[0][role].tokens == int(mask.sum()) and seen[0][role].sequences == 6


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["efficientxpert", "foresight", "wanda", "magnitude", "sparsegpt"])
def test_every_method_reaches_exact_sparsity_and_resets_the_adapter(family, method):
    model = lora_model(family=family)
    report = prune(model, padded_calib(), PruneConfig(method=method, sparsity=0.5))
    arch = architecture_map(model)
    for block in arch.blocks:
        for role, module in block.targets.items():
            w = base_linear(module).weight
            assert int((w == 0).sum()) >= math.floor(w.shape[1] * 0.5) * w.shape[0] or method == "sparsegpt"
            entry = report.modules[block.qualified(role)]
            assert entry["zeros"] >= entry["total"] - entry["kept"]
            assert module.lora_B["default"].weight.abs().sum() == 0
    if method != "sparsegpt":  # SparseGPT selects per 128-column block: exact per block, floor per block
        assert report.sparsity == pytest.approx(math.floor(32 * 0.5) / 32, abs=1e-9)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["efficientxpert", "wanda", "sparsegpt", "magnitude"])
def test_nm_patterns(pattern, method):
    n, m = map(int, pattern.split(":"))
    model = lora_model()
    prune(model, padded_calib(), PruneConfig(method=method, pattern=pattern))
    for block in architecture_map(model).blocks:
        for module in block.targets.values():
            w = base_linear(module).weight
            assert ((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all()


def test_merge_applies_the_adapter_before_masking():
    model = lora_model()
    arch = architecture_map(model)
    module = arch.blocks[0].targets["q"]
    A, B = module.lora_A["default"].weight.clone(), module.lora_B["default"].weight.clone()
    U = base_linear(module).weight.detach().clone() + module.scaling["default"] * B @ A
    prune(model, padded_calib(), PruneConfig(method="magnitude", sparsity=0.5))
    w = base_linear(module).weight
    keep = w != 0
    torch.testing.assert_close(w[keep], U[keep])
    assert torch.equal(keep, select_keep_mask(U.abs(), 0.5))


def pruned_sets(model) -> dict[str, set[int]]:
    """The flat indices of every target's zero weights."""
    arch = architecture_map(model)
    return {block.qualified(r): set((base_linear(m).weight.reshape(-1) == 0).nonzero().flatten().tolist())
            for block in arch.blocks for r, m in block.targets.items()}


def q_score_by_hand(model, calib) -> torch.Tensor:
    """The efx ForeSight score of block 0's q, written out: |U_q| * sqrt(E[x^2]) * ||row (g(h), e) of U_k||,
    with x the non-padding inputs of q (which no pruning of this call changes: they come from the embeddings)."""
    arch = architecture_map(model)
    block = arch.blocks[0]
    seen = []
    handle = block.targets["q"].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in calib:
            model(**batch)
    handle.remove()
    x = torch.cat([h[b["attention_mask"].bool()] for h, b in zip(seen, calib)])
    g = (x.double() ** 2).mean(0)
    U = {}
    for role in ("q", "k"):
        module = block.targets[role]
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        U[role] = base_linear(module).weight.double() + module.scaling["default"] * B.double() @ A.double()
    d, group = arch.head_dim, arch.group_size
    k_rows = torch.stack([U["k"][(i // d // group) * d + i % d].norm() for i in range(U["q"].shape[0])])
    return (U["q"].abs() * g.sqrt()[None, :] * k_rows[:, None]).float()


def set_lora_b(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1


@pytest.mark.parametrize("offload", [True, False])
def test_score_memory_blends_scores_and_overlap_is_the_jaccard_of_the_pruned_sets(offload):
    model = lora_model()
    calib = padded_calib()
    q = "model.layers.0.self_attn.q_proj"
    memory = PruneMemory(scores=CarriedTensors(offload=offload), masks=CarriedTensors(offload=offload))
    first_score = q_score_by_hand(model, calib)
    first = prune(model, calib, PruneConfig(sparsity=0.3), memory=memory)
    assert first.mask_overlap is None and memory.calls == 1 and len(memory.scores) == 14
    remembered = memory.scores.get(q)
    assert remembered.dtype == torch.bfloat16
    torch.testing.assert_close(remembered.float(), first_score, rtol=1e-2, atol=1e-3)  # bf16
    pruned_first = pruned_sets(model)
    set_lora_b(model, 7)  # training moved the adapter
    blended = 0.7 * q_score_by_hand(model, calib) + 0.3 * remembered.float()  # eta = mask_lr = 0.7
    second = prune(model, calib, PruneConfig(sparsity=0.3, mask_lr=0.7), memory=memory)
    torch.testing.assert_close(memory.scores.get(q).float(), blended, rtol=1e-2, atol=1e-3)
    keep_q = base_linear(architecture_map(model).blocks[0].targets["q"]).weight != 0
    assert torch.equal(keep_q, select_keep_mask(blended, 0.3))
    pruned_second = pruned_sets(model)
    jaccard = [len(pruned_first[n] & pruned_second[n]) / len(pruned_first[n] | pruned_second[n]) for n in pruned_first]
    assert second.mask_overlap == pytest.approx(sum(jaccard) / len(jaccard), rel=1e-6)
    assert second.mask_overlap < 1.0  # the new adapter moved some of the mask
    prune(model, calib, PruneConfig(sparsity=0.3, use_memory=False), memory=memory)
    assert len(memory.scores) == 0 and memory.scores.get(q) is None


def test_carry_sets_what_the_memory_keeps(monkeypatch, tmp_path):
    model = lora_model()
    memory = PruneMemory()
    first = prune(model, padded_calib(), PruneConfig(sparsity=0.3), memory=memory, carry="masks")  # one name
    assert len(memory.scores) == 0 and len(memory.masks) == 14
    last = prune(model, padded_calib(), PruneConfig(sparsity=0.3), memory=memory, carry=())
    assert last.mask_overlap is not None and len(memory.masks) == 0
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="carry"):
        prune(model, padded_calib(), PruneConfig(), carry=("weights",))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real_mkdtemp(*a, **k)) or made[-1])
    work = tmp_path / "work"
    work.mkdir()
    # a call without memory keeps nothing: its only files are the undo, in work_dir, removed at the end
    assert prune(model, padded_calib(), PruneConfig(sparsity=0.3), work_dir=work).sparsity == first.sparsity
    assert len(made) == 1 and made[0].startswith(str(work)) and not any(work.iterdir())


@pytest.mark.parametrize("shape", [(5, 13), (8, 8)])  # 65 bits pad the last byte; 64 do not
def test_mask_overlap_on_packed_bits_is_the_jaccard_index_of_the_pruned_sets(shape):
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.rand(shape, generator=gen) > 0.4 for _ in range(2))
    pruned_a, pruned_b = set(torch.nonzero(~a.reshape(-1)).flatten().tolist()), \
        set(torch.nonzero(~b.reshape(-1)).flatten().tolist())
    want = len(pruned_a & pruned_b) / len(pruned_a | pruned_b)
    assert mask_overlap(pack_mask(a), pack_mask(b), a.numel()) == pytest.approx(want)
    assert mask_overlap(None, pack_mask(b), b.numel()) is None
    everything = torch.ones(shape, dtype=torch.bool)  # nothing pruned in either call
    assert mask_overlap(pack_mask(everything), pack_mask(everything), everything.numel()) == 1.0


def test_kept_masks_match_the_weights():
    model = lora_model()
    memory = PruneMemory()
    for _ in range(2):
        prune(model, padded_calib(), PruneConfig(sparsity=0.3), memory=memory)
        for block in architecture_map(model).blocks:
            for role, module in block.targets.items():
                weight = base_linear(module).weight
                packed = memory.masks.get(block.qualified(role))
                assert torch.equal(unpack_mask(packed, weight.shape), weight != 0)


def test_carried_tensors_in_files_and_in_ram_agree():
    score = torch.randn(7, 9).to(torch.bfloat16)
    packed = pack_mask(torch.rand(5, 13) > 0.5)
    stores = [CarriedTensors(offload=True), CarriedTensors(offload=False)]
    for store in stores:
        store.stage("a", score)
        store.stage("m", packed)
        assert store.get("a") is None            # staged, not committed
        store.commit()
        store.stage("a", score * 2)
        store.discard()                          # a failed call leaves the committed entries
        assert torch.equal(store.get("a"), score) and store.get("a").dtype == torch.bfloat16
        assert torch.equal(store.get("m"), packed) and store.get("m").dtype == torch.uint8
    folder = stores[0]._root
    assert len(list(folder.rglob("*.bin"))) == 2
    del stores
    assert not folder.exists()               # the temporary folder goes with the store


@pytest.mark.parametrize("config, message", [
    (PruneConfig(sparsity=1.0), "outside"), (PruneConfig(sparsity=-0.1), "outside"),
    (PruneConfig(pattern="4:4"), "N:M"), (PruneConfig(pattern="2:3"), "divisible"),
    (PruneConfig(targets=("qkv",)), "match no module"), (PruneConfig(method="obs"), "method"),
])
def test_bad_settings_fail_before_any_change(config, message):
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune(model, padded_calib(), config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_calibration_and_nan_weights_are_rejected():
    model = lora_model()
    with pytest.raises(ValueError, match="empty"):
        prune(model, [], PruneConfig())
    base_linear(architecture_map(model).blocks[1].targets["up"]).weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune(model, padded_calib(), PruneConfig())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_failure_mid_pass_restores_every_weight_from_its_undo_files(dtype, tmp_path):
    model = lora_model().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arch = architecture_map(model)
    # non-finite activations appear only when block 1 runs, after block 0 was pruned
    hook = arch.blocks[1].targets["down"].register_forward_pre_hook(lambda m, a: (a[0] * float("inf"),))
    with pytest.raises(FloatingPointError, match="non-finite"):
        prune(model, padded_calib(), PruneConfig(), work_dir=tmp_path)
    hook.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model left half-pruned"
    assert not any(tmp_path.iterdir())  # the undo files are gone after a failure too


def test_wanda_matches_a_straightforward_implementation():
    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(8, 16, generator=gen), torch.randn(50, 16, generator=gen)
    keep = select_keep_mask(wanda_score(W, X.pow(2).mean(0), 50), 0.5)
    for i in range(8):
        metric = [abs(W[i, j].item()) * X[:, j].norm().item() for j in range(16)]
        pruned = sorted(range(16), key=lambda j: metric[j])[:8]
        assert set((~keep[i]).nonzero().flatten().tolist()) == set(pruned)


def sparsegpt_by_elimination(W, H, sparsity, block, nm=None, damp=0.01):
    """OBS one column at a time with an explicit inverse, eliminated column by column."""
    W = W.double().clone()
    n = W.shape[1]
    H = H.double() + damp * H.diagonal().mean().double() * torch.eye(n, dtype=torch.float64)
    h_inv = torch.linalg.inv(H)
    seq, d2 = h_inv.clone(), []
    for i in range(n):
        d2.append(seq[i, i].item())
        seq = seq - torch.outer(seq[:, i], seq[i, :]) / seq[i, i]
    d2 = torch.tensor(d2, dtype=torch.float64)
    keep = torch.ones_like(W, dtype=torch.bool)
    current = h_inv.clone()
    for start in range(0, n, block):
        end = min(start + block, n)
        if nm is None:
            sal = (W[:, start:end] ** 2 / d2[start:end]).reshape(-1)
            k = math.floor(sal.numel() * sparsity)
            drop = torch.sort(sal, stable=True).indices[:k]
            flat = keep[:, start:end].reshape(-1).clone()
            flat[drop] = False
            keep[:, start:end] = flat.reshape(W.shape[0], -1)
        for i in range(start, end):
            if nm is not None and (i - start) % nm[1] == 0:
                sal = W[:, i:i + nm[1]] ** 2 / d2[i:i + nm[1]]
                drop = torch.sort(sal, dim=1, stable=True).indices[:, :nm[1] - nm[0]]
                keep[:, i:i + nm[1]].scatter_(1, drop, False)
            q = torch.where(keep[:, i], W[:, i], torch.zeros_like(W[:, i]))
            W[:, i:] -= torch.outer((W[:, i] - q) / current[i, i], current[i, i:])
            W[:, i] = q
            current = current - torch.outer(current[:, i], current[i, :]) / current[i, i]
    return W, keep


@pytest.mark.parametrize("pattern, nm", [("unstructured", None), ("2:4", (2, 4))])
def test_sparsegpt_matches_column_by_column_obs(pattern, nm):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 24, generator=gen)
    X = torch.randn(80, 24, generator=gen)
    H = X.T @ X / 80
    got, keep = sparsegpt(W, H, 0.5, pattern, block_size=8)
    want, want_keep = sparsegpt_by_elimination(W, H, 0.5, 8, nm)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_targets_that_read_one_input_share_one_hessian():
    model = lora_model()
    arch = architecture_map(model)
    seen = []
    calibrate(model, arch, padded_calib(), lambda block, stats: seen.append(stats), hessian=True)
    stats = seen[0]
    assert stats["q"] is stats["k"] is stats["v"] and stats["gate"] is stats["up"]
    distinct = {id(s.hessian_sum) for s in stats.values()}
    assert len(distinct) == 4  # q/k/v, o, gate/up, down
    # the shared entry counted its input once: the same tokens as o's
    assert stats["q"].tokens == stats["o"].tokens == 6 * 12 - 5 - 10
