"""A sparse base with the trained adapter kept beside it, unmerged: the pruning call that leaves
the adapter alone, the schedule's ending, the saved and exported folders, and what loads them."""
import json

import pytest
import torch
from conftest import EXAMPLES, char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from efx.cli.export import SPARSITY_FILE, export
from efx.cli.main import main
from efx.method.prune import PruneConfig, prune
from efx.model.adapter import ADAPTER, load_adapter, save_with_adapter
from efx.model.arch import architecture_map, base_linear, lora_parts
from efx.model.checkpoint import load_sparse
from efx.recipes import prune_and_adapt
from efx.training import LoraSettings, TrainSettings, add_lora


def targets(model):
    return {b.qualified(r): m for b in architecture_map(model).blocks for r, m in b.targets.items()}


def test_a_call_without_merge_prunes_w_by_its_own_score_and_leaves_the_adapter():
    torch.manual_seed(0)
    model = add_lora(tiny_model("llama", vocab_size=256), LoraSettings(r=4))
    for module in targets(model).values():  # a trained-looking adapter: B != 0
        torch.nn.init.normal_(lora_parts(module)[1], std=0.5)
    before = {n: (base_linear(m).weight.clone(), *[t.clone() for t in lora_parts(m)[:2]])
              for n, m in targets(model).items()}
    prune(model, torch.randint(0, 256, (4, 12)), PruneConfig(method="magnitude", sparsity=0.5, merge=False))
    for name, module in targets(model).items():
        W, A, B = before[name]
        A2, B2, _ = lora_parts(module)
        assert torch.equal(A2, A) and torch.equal(B2, B), name  # the adapter is untouched
        # magnitude of W alone, half of each row: the largest |W| keep their value, the rest are +0.0
        order = W.abs().argsort(dim=1, descending=True, stable=True)
        keep = torch.zeros_like(W, dtype=torch.bool).scatter_(1, order[:, : W.shape[1] // 2], True)
        assert torch.equal(base_linear(module).weight, torch.where(keep, W, torch.zeros_like(W))), name
    with pytest.raises(ValueError, match="merge=False"):
        PruneConfig(merge=False, pbs=True).validate()


@pytest.fixture(scope="module")
def kept():
    """An EfficientXpert run that ends with the adapter kept (epoch schedule, 50%), on a model
    whose head is tied to its embedding (as the embedded model's is)."""
    tok = char_tokenizer()
    model, report = prune_and_adapt(tiny_model("llama", vocab_size=256, tie_word_embeddings=True), tok, EXAMPLES,
                                    prune=PruneConfig(sparsity=0.5), keep_adapter=True,
                                    training=TrainSettings(epochs=3, n_examples=0, batch_size=4, learning_rate=1e-2))
    model.eval()
    return model, tok, report


def test_keep_adapter_ends_with_an_exactly_sparse_base_and_a_trained_adapter(kept):
    model, _, report = kept
    assert report["keep_adapter"] and [c["when"] for c in report["calls"]][-1] == "train end"
    assert report["calls"][-1]["config"]["merge"] is False and report["calls"][0]["config"]["merge"] is True
    for name, module in targets(model).items():
        W = base_linear(module).weight
        assert int((W == 0).sum()) == W.shape[0] * (W.shape[1] // 2), name  # half of every row
        assert lora_parts(module)[1].abs().sum() > 0, name  # B trained since the last intermediate call


def test_base_and_adapter_reload_with_peft_and_packed_with_the_same_logits(kept, tmp_path):
    from peft import PeftModel
    model, tok, _ = kept
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    import copy
    base = save_with_adapter(copy.deepcopy(model), tok, tmp_path / "expert")
    assert not any(lora_parts(m) for m in targets(base).values())  # the adapter layers are gone from the base
    export(str(tmp_path / "expert"), str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert "sparsity_config" not in config and "quantization_config" not in config
    audit = json.loads((tmp_path / "out" / "hf" / SPARSITY_FILE).read_text())
    assert audit["overall"] == pytest.approx(0.5) and audit["unmerged_adapter"] == ADAPTER
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf"),
                                         str(tmp_path / "out" / ADAPTER)).eval()
    packed = load_sparse(tmp_path / "out" / "packed")[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(ids).logits, want, rtol=1e-5, atol=1e-5)
        # and the adapter does something: the base alone computes other logits
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")(ids).logits, want,
                                  atol=1e-3)
    with pytest.raises(FileNotFoundError, match="no peft adapter"):
        load_adapter(base, tmp_path / "out" / "hf")


def test_run_keep_adapter_saves_evaluates_and_exports_base_plus_adapter(tmp_path, capsys):
    from test_cli import tiny_setup
    tmp_path, args = tiny_setup.__wrapped__(tmp_path)
    out = tmp_path / "out"
    assert main(args + ["--output", str(out), "--keep-adapter"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=0.02)
    assert (out / "expert" / ADAPTER / "adapter_config.json").is_file()
    assert (out / "expert_packed" / "efx_sparse.json").is_file()
    # efx eval picks the adapter up and scores what the run scored
    assert main(["eval", "--model", str(out / "expert"), "--domain", args[4], "--output",
                 str(tmp_path / "eval.json")]) == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    ours, theirs = dict(scored["tasks"]["quiz"]), dict(report["expert_eval"]["tasks"]["quiz"])
    assert ours.pop("correct_norm") == theirs.pop("correct_norm")
    assert ours == pytest.approx(theirs)
    assert scored["perplexity"]["perplexity"] == pytest.approx(report["expert_eval"]["perplexity"]["perplexity"],
                                                               rel=1e-5)
    assert main(["export", "--model", str(out / "expert"), "--output", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / ADAPTER / "adapter_config.json").is_file()
    for extra, message in ((["--method", "dense"], "--keep-adapter applies"),):
        assert main(args + ["--output", str(tmp_path / "never"), "--keep-adapter"] + extra) == 2
        assert message in capsys.readouterr().err
