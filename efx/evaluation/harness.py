"""The lm-evaluation-harness fit: a suite's test tasks as an lm-eval task folder, and lm-eval's
`acc` and `acc_norm` computed by efx on the same items.

An exported item gives lm-eval what efx scores: the context is the prompt as the model sees it
(the chat template applied, with the suite's system message), and the choices follow it with
no delimiter. lm-eval (0.4, `multiple_choice`) moves the context's trailing whitespace to the
front of the continuation, tokenizes context + continuation together and splits the ids at the
context's own length; `acc` picks the choice of largest log-likelihood, `acc_norm` the largest
log-likelihood per character of the choice. efx's `accuracy_norm` divides by tokens instead,
so the two normalized figures are not comparable; `acc_norm` is.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from efx.data.prompts import format_prompt
from efx.io import atomic_folder

log = logging.getLogger(__name__)


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's HF model makes them: the tokenizer's special tokens added, unless
    the text already starts with the BOS token."""
    bos = tokenizer.bos_token
    add = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's rule for causal models."""
    if not context:
        raise ValueError("an lm-eval context cannot be empty")
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenize(tokenizer, stripped)
    return context_ids, tokenize(tokenizer, stripped + continuation)[len(context_ids):]


def metrics(items: list[dict], logliks: list[list[float]]) -> dict:
    """lm-eval's `acc` and `acc_norm` (log-likelihood per character of the choice); the first
    of equal scores wins, as numpy's argmax picks it."""
    def argmax(values):
        return max(range(len(values)), key=values.__getitem__)
    acc = [argmax(lls) == it["answer"] for it, lls in zip(items, logliks)]
    norm = [argmax([ll / len(c) for ll, c in zip(lls, it["choices"])]) == it["answer"]
            for it, lls in zip(items, logliks)]
    return {"acc": sum(acc) / len(items), "acc_norm": sum(norm) / len(items)}


def task_name(suite_name: str, task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"efx_{suite_name}_{task}")


def export_suite(suite, tokenizer, output: str | Path, *, max_items: int | None = None,
                 overwrite: bool = False) -> list[str]:
    """Write each test task of `suite` as `<task>.jsonl` (context, choices, gold index) and an
    lm-eval task file `<task>.yaml` (`dataset_path: json`, `data_files` by absolute path) into
    `output`, so that `lm_eval --include_path OUTPUT --tasks NAME` scores what `efx eval` scores.
    The contexts are formatted with `tokenizer`'s chat template: export with the tokenizer of the
    model to be evaluated. Returns the task names."""
    output = Path(output).resolve()
    names = []
    with atomic_folder(output, overwrite=overwrite) as tmp:
        for task, items in suite.tasks.items():
            name = task_name(suite.name, task)
            rows = [{"context": format_prompt(tokenizer, it["prompt"], suite.system), "choices": it["choices"],
                     "gold": it["answer"]} for it in items[:max_items]]
            with open(tmp / f"{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            (tmp / f"{name}.yaml").write_text(_task_yaml(name, output / f"{name}.jsonl"))
            names.append(name)
            log.info("%s: %d items", name, len(rows))
    return names


def _task_yaml(name: str, data: Path) -> str:
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",  # column names: lm-eval reads the fields as they are
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        ""])
