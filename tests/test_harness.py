"""The lm-evaluation-harness fit: lm-eval's tokenization and metrics written out by hand, the
exported task folder, and (where lm_eval is installed) lm_eval's own scores on the same items."""
import json

import pytest
import torch
from conftest import char_tokenizer, tiny_model

from efx.data.suites import Suite
from efx.evaluation import harness
from efx.evaluation.evaluate import choice_logprobs, evaluate

ITEMS = [{"prompt": "ab", "choices": ["c", "dd", "efg"], "answer": 1},
         {"prompt": "a much longer prompt", "choices": ["x", "yz", "q"], "answer": 0},
         {"prompt": "say it", "choices": ["yes", "no"], "answer": 1},
         {"prompt": "pick", "choices": ["aaaa", "b"], "answer": 0}]


def bos_tokenizer():
    """The character tokenizer with a BOS id prepended by default, as many tokenizers do."""
    from tokenizers.processors import TemplateProcessing
    tok = char_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 1)])
    tok.bos_token = "<eos>"
    return tok


def test_encode_pair_moves_the_contexts_trailing_whitespace_into_the_continuation():
    tok = char_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert harness.encode_pair(tok, "ab \n", "cd") == (ids("ab"), ids(" \ncd"))
    bos = bos_tokenizer()
    assert harness.encode_pair(bos, "ab", "c") == ([1] + ids("ab"), ids("c"))
    assert harness.encode_pair(bos, "<eos>ab", "c") == ([1] + ids("ab"), ids("c"))  # no second BOS
    with pytest.raises(ValueError, match="empty"):
        harness.encode_pair(tok, "", "c")


def test_acc_norm_divides_by_characters_and_ties_go_to_the_first():
    items = [{"choices": ["a", "bbbb"], "answer": 1}, {"choices": ["aa", "bb"], "answer": 1}]
    # item 0: raw picks "a" (-2 > -3), per character picks "bbbb" (-0.75 > -2); item 1: a tie picks "aa"
    scores = harness.metrics(items, [[-2.0, -3.0], [-1.0, -1.0]])
    assert scores == {"acc": 0.0, "acc_norm": 0.5}


@pytest.mark.parametrize("make_tokenizer", [char_tokenizer, bos_tokenizer], ids=["shared-prefix", "rescored"])
def test_harness_log_likelihood_is_that_of_lm_evals_tokens_by_hand(make_tokenizer):
    model = tiny_model("llama", vocab_size=256)
    tok = make_tokenizer()
    got = choice_logprobs(model, tok, ITEMS, batch_size=3, harness=True)
    for item, scores in zip(ITEMS, got):
        for choice, (_, _, ll) in zip(item["choices"], scores):
            context, continuation = harness.encode_pair(tok, item["prompt"] + "\n", choice)
            with torch.no_grad():
                logp = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
            want = sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
            assert ll == pytest.approx(want, abs=1e-4)
    # efx's own figures are unchanged by the harness option
    plain = choice_logprobs(model, tok, ITEMS, batch_size=3)
    flat = lambda rows: [x for row in rows for c in row for x in c[:2]]  # noqa: E731
    assert flat(got) == pytest.approx(flat(plain), abs=1e-5)


def suite_of(items):
    return Suite(name="toy", train=[], tasks={"first": items[:2], "second": items[2:]}, ppl_texts=[])


def test_export_writes_the_items_and_a_task_file_per_task(tmp_path):
    tok = char_tokenizer()
    names = harness.export_suite(suite_of(ITEMS), tok, tmp_path / "tasks", max_items=1)
    assert names == ["efx_toy_first", "efx_toy_second"]
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "efx_toy_first.jsonl").read_text().splitlines()]
    assert rows == [{"context": "ab\n", "choices": ["c", "dd", "efg"], "gold": 1}]
    yaml = (tmp_path / "tasks" / "efx_toy_first.yaml").read_text()
    assert "dataset_path: json" in yaml and str(tmp_path / "tasks" / "efx_toy_first.jsonl") in yaml
    assert 'target_delimiter: ""' in yaml
    with pytest.raises(FileExistsError, match="not empty"):
        harness.export_suite(suite_of(ITEMS), tok, tmp_path / "tasks")


def test_lm_eval_scores_the_exported_tasks_as_efx_eval_does(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is an optional extra")
    from lm_eval.tasks import TaskManager
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama", vocab_size=256, seed=3), char_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    items = [{"prompt": f"question {i}", "choices": ["yes", "no", "maybe"][: 2 + i % 2], "answer": i % 2}
             for i in range(12)]
    suite = suite_of(items)
    names = harness.export_suite(suite, tok, tmp_path / "tasks")
    ours = evaluate(model, tok, suite, ppl=False)["tasks"]
    result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'model'},dtype=float32",
                                     tasks=names, task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                     batch_size=4, device="cpu", log_samples=True)
    for task, name in zip(suite.tasks, names):
        theirs = result["results"][name]
        assert theirs["acc,none"] == pytest.approx(ours[task]["acc"])
        assert theirs["acc_norm,none"] == pytest.approx(ours[task]["acc_norm"])
        samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
        logliks = choice_logprobs(model, tok, suite.tasks[task], harness=True)
        for sample, scores in zip(samples, logliks):
            assert [r[0][0] for r in sample["resps"]] == pytest.approx([s[2] for s in scores], abs=1e-4)


def test_suite_export_command_formats_with_the_models_chat_template(tmp_path, capsys):
    from efx.cli.main import main
    from transformers import AutoTokenizer
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    tok.save_pretrained(tmp_path / "model")
    tiny_model("llama", vocab_size=256).save_pretrained(tmp_path / "model")
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(it) for it in ITEMS) + "\n")
    code = main(["suite", "export", "--domain", str(tmp_path / "cases.jsonl"), "--model", str(tmp_path / "model"),
                 "--output", str(tmp_path / "tasks"), "--eval-items", "2"])
    assert code == 0 and "--tasks efx_cases_cases" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "efx_cases_cases.jsonl").read_text().splitlines()]
    want = AutoTokenizer.from_pretrained(tmp_path / "model").apply_chat_template(
        [{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True)
    assert len(rows) == 2 and rows[0]["context"] == want == "[user] ab\n[assistant] "
    assert main(["suite", "export", "--domain", str(tmp_path / "cases.jsonl"), "--output", str(tmp_path / "tasks"),
                 "--model", str(tmp_path / "model")]) == 2  # the folder is not empty: refused
