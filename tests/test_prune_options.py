"""Every preset and option of a pruning call, end to end through `efx.prune`, and
the settings a call refuses."""
import copy
import math
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import tiny_model
from efx.method.prune import PruneConfig, prune
from efx.model.arch import architecture_map, base_linear, lora_parts
from efx.model.sparse_linear import SparseLoRALinear
from test_calibration_and_prune import lora_model, padded_calib

Q0 = "model.layers.0.self_attn.q_proj"


def weights(model) -> dict[str, torch.Tensor]:
    arch = architecture_map(model)
    return {block.qualified(r): base_linear(m).weight.detach().clone()
            for block in arch.blocks for r, m in block.targets.items()}


def adapters_reset(model) -> bool:
    return all(not lora_parts(m)[1].any() for block in architecture_map(model).blocks for m in block.targets.values())


def row_counts_exact(w: torch.Tensor, sparsity: float) -> bool:
    return bool(((w == 0).sum(1) == math.floor(w.shape[1] * sparsity)).all())


def test_paper_preset_prunes_per_row_with_column_factors():
    """The authors' preset: exact per-row sparsity, adapters reset, and a mask unlike the efx
    preset's (its column-indexed partner factors change the per-row ranking, and U omits s)."""
    paper, efx = lora_model(), lora_model()
    prune(paper, padded_calib(), PruneConfig(sparsity=0.5, preset="paper"))
    prune(efx, padded_calib(), PruneConfig(sparsity=0.5, preset="efx"))
    got, other = weights(paper), weights(efx)
    assert all(row_counts_exact(w, 0.5) for w in got.values()) and adapters_reset(paper)
    assert not torch.equal(got[Q0] == 0, other[Q0] == 0)


def output_error(model_before, model_after, calib, role="q") -> float:
    """||X (W_after - U_before)^T||^2 of block 0's `role`, X its (non-padding) inputs."""
    target = architecture_map(model_before).blocks[0].targets[role]
    seen = []
    handle = target.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in calib:
            model_before(**batch)
    handle.remove()
    x = torch.cat([h[b["attention_mask"].bool()] for h, b in zip(seen, calib)]).double()
    A, B, s = (t.detach() if torch.is_tensor(t) else t for t in lora_parts(target))
    U = base_linear(target).weight.double() + s * B.double() @ A.double()
    after = base_linear(architecture_map(model_after).blocks[0].targets[role]).weight.double()
    return float(((x @ (after - U).T) ** 2).sum())


@pytest.mark.parametrize("option", [{"pbs_hessian": True}, {"pbs_max_pruned_per_row": 3}, {"pbs_keep_weight": 0.5}])
def test_pbs_options_keep_the_mask_and_change_the_merge(option):
    """Each PBS variant keeps ForeSight's mask, prunes exactly, and moves the merged weights.
    Block 0's q is scored before any PBS update can reach its inputs or its partners, so its mask
    must equal the one without PBS. Hessian PBS, which minimizes the output error under the full
    E[x x^T] in the adapter's row space (db = 0 is a candidate), never ends above no PBS there."""
    calib = padded_calib()
    original = lora_model()
    with_pbs, without = copy.deepcopy(original), copy.deepcopy(original)
    prune(with_pbs, calib, PruneConfig(sparsity=0.5, **option))
    prune(without, calib, PruneConfig(method="foresight", sparsity=0.5))
    a, b = weights(with_pbs), weights(without)
    assert torch.equal(a[Q0] == 0, b[Q0] == 0)
    assert all(row_counts_exact(w, 0.5) for w in a.values())
    assert not torch.allclose(a[Q0], b[Q0])
    if option.get("pbs_hessian"):
        assert output_error(original, with_pbs, calib) <= output_error(original, without, calib) * (1 + 1e-6)


def test_reconstruct_keeps_the_foresight_mask_and_lowers_the_output_error():
    """The OBS update under ForeSight's mask: the same zeros as ForeSight alone (block 0's q is
    scored before any update reaches it), and a smaller output error on the calibration inputs."""
    calib = padded_calib()
    original = lora_model()
    rebuilt, plain = copy.deepcopy(original), copy.deepcopy(original)
    prune(rebuilt, calib, PruneConfig(sparsity=0.5, reconstruct=True))
    prune(plain, calib, PruneConfig(method="foresight", sparsity=0.5))
    a, b = weights(rebuilt), weights(plain)
    assert torch.equal(a[Q0] == 0, b[Q0] == 0) and adapters_reset(rebuilt)
    assert output_error(original, rebuilt, calib) < 0.9 * output_error(original, plain, calib)


def test_reconstruct_at_2_4_chooses_the_groups_in_the_obs_sweep():
    """At 2:4 the rebuild's solve chooses each group's two keeps by SparseGPT's rule on W + s*B@A:
    block 0's q (the same inputs for both) ends as SparseGPT leaves it, with zeros other than
    ForeSight's |U| * sqrt(E[x^2]) choice and a smaller output error than ForeSight's mask rebuilt."""
    calib = padded_calib()
    original = lora_model()
    rebuilt, sparsegpt, plain = (copy.deepcopy(original) for _ in range(3))
    prune(rebuilt, calib, PruneConfig(pattern="2:4", reconstruct=True))
    prune(sparsegpt, calib, PruneConfig(method="sparsegpt", pattern="2:4"))
    prune(plain, calib, PruneConfig(method="foresight", pattern="2:4"))
    a, s, b = weights(rebuilt)[Q0], weights(sparsegpt)[Q0], weights(plain)[Q0]
    assert torch.equal(a, s) and adapters_reset(rebuilt)
    assert ((a != 0).view(-1, 4).sum(1) <= 2).all()
    assert not torch.equal(a == 0, b == 0)
    assert output_error(original, rebuilt, calib) < output_error(original, plain, calib)


def test_pbs_max_pruned_per_row_differs_from_full_pbs():
    calib = padded_calib()
    limited, full = lora_model(), lora_model()
    prune(limited, calib, PruneConfig(sparsity=0.5, pbs_max_pruned_per_row=2))
    prune(full, calib, PruneConfig(sparsity=0.5))
    assert not torch.allclose(weights(limited)[Q0], weights(full)[Q0])


def test_a_targets_subset_prunes_those_and_leaves_the_rest():
    model = lora_model()
    before = weights(model)
    report = prune(model, padded_calib(), PruneConfig(sparsity=0.5, targets=("q_proj", "down")))
    after = weights(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed == {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")}
    assert set(report.modules) == changed and report.sparsity == pytest.approx(0.5)


def test_generic_decoder_fallback_prunes_every_linear_of_the_blocks():
    import transformers
    config = transformers.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model, torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(0)),
                       PruneConfig(sparsity=0.5))
    assert any("generic fallback" in str(w.message) for w in caught)
    linears = [n for n, m in model.model.decoder.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(report.modules) == len(linears) == 12  # q, k, v, out, fc1, fc2 per block
    for name, module in model.model.decoder.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert row_counts_exact(module.weight, 0.5), name


@pytest.mark.parametrize("method", ["efficientxpert", "foresight", "wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_zero_a_call_leaves_is_positive(method, pattern):
    """x * 0 is -0.0 for a negative x; packers and `w == 0` audits on bit patterns disagree about
    it. Every zero a call leaves must be +0.0."""
    model = lora_model()
    prune(model, padded_calib(), PruneConfig(method=method, sparsity=0.5, pattern=pattern))
    for name, w in weights(model).items():
        zeros = w == 0
        assert zeros.any() and not torch.signbit(w[zeros]).any(), name


def test_the_mask_preserving_merge_leaves_positive_zeros():
    linear = torch.nn.Linear(64, 8)
    keep = torch.rand(8, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    layer = SparseLoRALinear.from_linear(linear, keep, format="masked", r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    w = layer.dense_weight()
    assert torch.equal(w != 0, keep) and not torch.signbit(w[~keep]).any()


@pytest.mark.parametrize("settings, message", [
    (dict(preset="paper", pattern="2:4"), "preset 'paper'"),
    (dict(pbs_keep_weight=1.5), r"outside \[0, 1\]"),
    (dict(pbs_keep_weight=-0.1), r"outside \[0, 1\]"),
    (dict(pbs_max_pruned_per_row=0), "pbs_max_pruned_per_row"),
    (dict(calib_batch_size=0), "calib_batch_size"),
    (dict(method="wanda", reconstruct=True), "reconstruct updates the weights kept by a ForeSight mask"),
    (dict(reconstruct=True, pbs=True), "choose one"),
])
def test_unsupported_settings_are_refused_before_any_change(settings, message):
    model = lora_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        prune(model, padded_calib(), PruneConfig(**settings))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("lora, message", [(dict(use_dora=True), "DoRA"),
                                           (dict(init_lora_weights="gaussian"), "init_lora_weights")])
def test_adapters_a_call_cannot_merge_as_peft_would_are_refused(lora, message):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        prune(model, padded_calib(), PruneConfig(sparsity=0.5))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_kernels_import_and_run_their_references_without_triton():
    """A machine without Triton (macOS, Windows) imports efx_kernels and runs every op on torch."""
    code = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError
import torch, efx_kernels
from efx_kernels import foresight_score, nm_keep_mask, pbs_delta_keep1, pack, sparse_lora_linear
assert not efx_kernels.triton_available()
W, A, B = torch.randn(8, 16), torch.randn(4, 16), torch.randn(8, 4)
score = foresight_score(W, A, B, 2.0, torch.rand(16))
keep = nm_keep_mask(score, 2, 4)
pbs_delta_keep1(W, A, B, 2.0, keep, torch.rand(16) + 0.1, 1e-6)
y = sparse_lora_linear(torch.randn(3, 16), pack(W, keep, "2:4"), A, B, 2.0)
print("ok", tuple(y.shape))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"EFX_KERNELS": "auto", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok (3, 8)"
