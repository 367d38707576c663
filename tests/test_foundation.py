"""Model loading, the architecture map, suites and user data, evaluation, LoRA training."""
import json
import math

import pytest
import torch

from conftest import EXAMPLES, char_tokenizer, tiny_model
from efx.model.arch import architecture_map
from efx.data.suites import DataError, load_suite, split_of
from efx.evaluation.evaluate import choice_logprobs, macro_f1, perplexity, retention, score_task
from efx.model.loading import ModelLoadError, load_model
from efx.training import TrainSettings, train_lora


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_architecture_map_of_supported_families(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    arch = architecture_map(loaded)
    assert arch.supported and arch.family == family
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.group_size) == (4, 2, 8, 2)
    assert len(arch.blocks) == 2 and arch.roles == ("q", "k", "v", "o", "gate", "up", "down")
    assert arch.blocks[1].qualified("down") == "model.layers.1.mlp.down_proj"
    assert arch.blocks[0].post_attention_norm is not None
    assert tok.pad_token is not None


def test_generic_fallback_warns_and_takes_every_linear():
    import transformers
    config = transformers.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match="generic fallback"):
        arch = architecture_map(model)
    assert not arch.supported
    assert set(arch.blocks[0].targets) == {"self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                           "self_attn.out_proj", "fc1", "fc2"}


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_model(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="local cache"):
        load_model("efx-no-such-org/no-such-model")


def test_builtin_suites_are_deterministic_disjoint_and_large_enough(tmp_path, monkeypatch):
    monkeypatch.setenv("EFX_CACHE", str(tmp_path))
    for name, answer_tasks in (("medical", ("hpo_term",)), ("legal", ("notice_license",))):
        suite = load_suite(name)
        again = load_suite(name, refresh=True)
        assert suite.tasks == again.tasks and suite.train == again.train
        assert len(suite.tasks) >= 2 and all(len(items) == 300 for items in suite.tasks.values())
        assert len(suite.ppl_texts) >= 50
        train_completions = {ex["completion"] for ex in suite.train}
        for task in answer_tasks:  # the answer is the source item itself: never seen in training
            assert not {it["choices"][it["answer"]] for it in suite.tasks[task]} & train_completions
        train_prompts = {ex["prompt"] for ex in suite.train}
        for items in suite.tasks.values():
            assert not {it["prompt"] for it in items} & train_prompts
            answers = [it["answer"] for it in items]
            assert max(answers.count(k) for k in range(4)) / len(answers) < 0.35  # positions balanced
    assert split_of("x", 0) == split_of("x", 0) and {split_of(str(i), 0) for i in range(100)} == {"train", "val",
                                                                                                 "test"}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_user_jsonl_data(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    write_jsonl(folder / "quiz.jsonl", [{"prompt": "q", "choices": ["a", "b"], "answer": "b"},
                                        {"prompt": "q2", "choices": ["a", "b", "c"], "answer": 0}])
    write_jsonl(folder / "ppl.jsonl", [{"text": "held out"}])
    suite = load_suite(folder)
    assert suite.train == [{"prompt": "p", "completion": "c"}]
    assert suite.tasks["quiz"][0]["answer"] == 1 and suite.ppl_texts == ["held out"]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q", "choices": ["a", "b"], "answer": "z"}], r"bad.jsonl:1: answer 'z' is not among"),
    ([{"prompt": "p", "completion": "c"}, {"prompt": "p"}], r"bad.jsonl:2: missing field 'completion'"),
    ([{"prompt": "p", "completion": "c"}, "{not json"], r"bad.jsonl:2: not valid JSON"),
    ([], r"bad.jsonl: the file is empty"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=message):
        load_suite(path)


def test_templates_convert_public_data_sets(tmp_path):
    path = write_jsonl(tmp_path / "pubmedqa.jsonl", [{"question": "Does X help?", "context": {"contexts": ["c"]},
                                                      "final_decision": "maybe"}])
    item = load_suite(path, template="pubmedqa").tasks["pubmedqa"][0]
    assert item["choices"][item["answer"]] == "maybe"
    path = write_jsonl(tmp_path / "casehold.jsonl", [{"citing_prompt": "c", "label": 2,
                                                      **{f"holding_{i}": f"h{i}" for i in range(5)}}])
    assert load_suite(path, template="casehold").tasks["casehold"][0]["answer"] == 2
    with pytest.raises(DataError, match="missing field 'gold_label'"):
        load_suite(write_jsonl(tmp_path / "m.jsonl", [{"sentence1": "a", "sentence2": "b"}]), template="mednli")


def test_choice_log_likelihood_by_hand():
    model = tiny_model("llama", vocab_size=256)
    tok = char_tokenizer()
    items = [{"prompt": "ab", "choices": ["c", "dd", "efg"], "answer": 1},
             {"prompt": "a much longer prompt", "choices": ["x", "yz"], "answer": 0},
             {"prompt": "abc", "choices": ["a longer choice", "q", "rs"], "answer": 2}]
    # batches of 2: the shared prefix "a", prompts reordered by length, choices in chunks
    got = choice_logprobs(model, tok, items, batch_size=2)
    for item, scores in zip(items, got):
        prompt = tok(item["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        for choice, (logp, count) in zip(item["choices"], scores):
            ids = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
            want = sum(logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids))
            assert count == len(ids) and logp == pytest.approx(want, abs=1e-4)


def test_perplexity_by_hand():
    model = tiny_model("llama", vocab_size=256)
    tok = char_tokenizer()
    texts = ["a long text of several words", "ab", "a text"]
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    got = perplexity(model, tok, texts, batch_size=2)
    assert got["tokens"] == count and got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_scores_accuracy_f1_and_retention():
    items = [{"prompt": "", "choices": ["a", "bb"], "answer": 0}, {"prompt": "", "choices": ["a", "bb"], "answer": 1},
             {"prompt": "", "choices": ["a", "bb"], "answer": 1}]
    logprobs = [[(-1.0, 1), (-1.5, 2)], [(-1.0, 1), (-1.5, 2)], [(-2.0, 1), (-1.0, 2)]]
    scores = score_task(items, logprobs)
    assert scores["accuracy"] == pytest.approx(2 / 3)       # raw picks a, a, bb
    assert scores["accuracy_norm"] == pytest.approx(2 / 3)  # per token picks bb, bb, bb
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert scores["majority_baseline"] == pytest.approx(2 / 3)
    assert macro_f1(["a", "b"], ["a", "a"]) == pytest.approx((2 / 3 + 0) / 2)
    dense = {"tasks": {"t": {"accuracy": 0.8, "majority_baseline": 0.4}}, "perplexity": {"perplexity": 10.0}}
    sparse = {"tasks": {"t": {"accuracy": 0.6, "majority_baseline": 0.4}}, "perplexity": {"perplexity": 12.5}}
    ret = retention(sparse, dense)
    assert ret["per_task"] == {"t": pytest.approx(0.75), "perplexity": pytest.approx(0.8)}
    assert ret["overall"] == pytest.approx(0.775) and ret["not_meaningful"] == []


def test_retention_of_a_task_dense_lora_does_not_win_is_flagged_and_left_out():
    """Dense LoRA at 0.26 under a majority baseline of 0.38: any expert score over it gives a
    retention that measures nothing, so it is named and kept out of the overall."""
    dense = {"tasks": {"icd": {"accuracy": 0.26, "majority_baseline": 0.38},
                       "hpo": {"accuracy": 0.70, "majority_baseline": 0.28}}, "perplexity": {"perplexity": 10.0}}
    expert = {"tasks": {"icd": {"accuracy": 0.24, "majority_baseline": 0.38},
                        "hpo": {"accuracy": 0.63, "majority_baseline": 0.28}}, "perplexity": {"perplexity": 20.0}}
    ret = retention(expert, dense)
    assert ret["not_meaningful"] == ["icd"]
    assert ret["per_task"]["icd"] == pytest.approx(0.24 / 0.26)
    assert ret["overall"] == pytest.approx((0.9 + 0.5) / 2)


def test_lora_training_lowers_the_loss():
    model = tiny_model("llama", vocab_size=256, initializer_range=0.3)  # logits with range to move
    tok = char_tokenizer()
    examples = EXAMPLES * 2
    settings = TrainSettings(epochs=8, n_examples=0, batch_size=8, learning_rate=3e-2, logging_steps=4)
    model, stats = train_lora(model, tok, examples, training=settings)
    losses = [e["loss"] for e in stats["log_history"] if "loss" in e]
    assert losses[-1] < 0.7 * losses[0]
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
