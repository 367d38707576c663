"""Evaluation: multiple-choice tasks scored by option log-likelihood, held-out perplexity,
and retention relative to a reference (method.md section 7)."""
from __future__ import annotations

import copy
import inspect
import logging
import math
from collections import Counter

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from efx.data.prompts import format_prompt, right_pad
from efx.evaluation import harness as harness_fit

log = logging.getLogger(__name__)


def _cache_arg() -> str:
    """Name of the KV-cache argument of causal LM forwards: `cache` in newer transformers,
    `past_key_values` before."""
    from transformers import LlamaForCausalLM
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_arg()


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _device(model) -> torch.device:
    return next(model.parameters()).device


def choice_logprobs(model, tokenizer, items: list[dict], *, system: str | None = None, batch_size: int = 16,
                    desc: str = "scoring", harness: bool = False) -> list[list[tuple]]:
    """Sum of log-probabilities and token count of every choice of every item, given its prompt.

    Each prompt runs once; its KV cache is copied to the item's choices, which are then scored
    together (left-padded prompts with explicit position ids, right-padded choices).
    Returns, per item, a list of (log-likelihood, number of choice tokens), and with `harness`
    a third element: the log-likelihood lm-eval gives the choice (`efx.evaluation.harness`).
    Where lm-eval's tokens are the prompt's last tokens plus the choice's (the usual case) that
    costs nothing more than the log-probabilities of those prompt tokens; other items are scored
    again with lm-eval's tokens.
    """
    pad = tokenizer.pad_token_id
    texts = [format_prompt(tokenizer, it["prompt"], system) for it in items]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    choices = []
    for it in items:
        ids = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in it["choices"]]
        empty = [c for c, i in zip(it["choices"], ids) if not i]
        if empty:
            raise ValueError(f"choice {empty[0]!r} encodes to no tokens")
        choices.append(ids)
    tails, redo = [0] * len(items), []
    if harness:
        for index, (it, text, prompt, ids) in enumerate(zip(items, texts, prompts, choices)):
            pairs = [harness_fit.encode_pair(tokenizer, text, c) for c in it["choices"]]
            context, tail = pairs[0][0], prompt[len(pairs[0][0]):]
            if prompt[:len(context)] == context and all(cont == tail + i for (_, cont), i in zip(pairs, ids)):
                tails[index] = len(tail)
            else:
                redo.append((index, context, [cont for _, cont in pairs]))
    results = _score(model, pad, prompts, choices, tails if harness else None, batch_size, desc)
    if harness:
        again = _score(model, pad, [r[1] for r in redo], [r[2] for r in redo], [0] * len(redo), batch_size,
                       desc + " (lm-eval tokens)") if redo else []
        redone = {index: scored for (index, _, _), scored in zip(redo, again)}
        results = [[(ll, n, redone[i][c][0] if i in redone else ll + tail_ll)
                    for c, (ll, n, tail_ll) in enumerate(row)] for i, row in enumerate(results)]
    return [[choice[:3] if harness else choice[:2] for choice in row] for row in results]


@torch.no_grad()
def _score(model, pad: int, prompts: list[list[int]], choices: list[list[list[int]]], tails: list[int] | None,
           batch_size: int, desc: str) -> list[list[tuple[float, int, float]]]:
    """Per item, per choice: (log-likelihood of the choice's ids after the prompt's ids, their
    count, log-likelihood of the prompt's last `tails[item]` ids given the ones before).

    The prefix all prompts share (the chat template and system prompt) runs once. Prompts of
    similar length share a batch, and a batch's choices run in chunks of similar length, each on
    its own copy of the prompts' KV cache: padding costs little compute."""
    device = _device(model)
    shared = _shared_prefix(prompts, tails)
    prefix_cache = None
    if shared:
        prefix_cache = _output_cache(model(input_ids=torch.tensor([prompts[0][:shared]], device=device),
                                           use_cache=True, logits_to_keep=1))
        prompts = [p[shared:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch"):
        index = order[start:start + batch_size]
        batch = [prompts[i] for i in index]
        tail = [0] * len(batch) if tails is None else [tails[i] for i in index]
        width = max(map(len, batch))
        prompt_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            prompt_ids[row, width - len(ids):] = torch.tensor(ids)
            prompt_mask[row, width - len(ids):] = 1
        positions = shared + (prompt_mask.cumsum(1) - 1).clamp(min=0)
        prompt_mask = torch.cat([torch.ones((len(batch), shared), dtype=torch.long), prompt_mask], 1)
        extra = {}
        if prefix_cache is not None:
            extra[_CACHE_ARG] = copy.deepcopy(prefix_cache)
            extra[_CACHE_ARG].batch_repeat_interleave(len(batch))
        keep = max(tail) + 1
        out = model(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                    position_ids=positions.to(device), use_cache=True, logits_to_keep=keep, **extra)
        first_logp = F.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
        tail_ll = torch.zeros(len(batch))
        if keep > 1:  # logits at width-keep .. width-2 predict the prompt's last keep-1 ids
            logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1).cpu()
            token_logp = logp.gather(2, prompt_ids[:, width - keep + 1:, None]).squeeze(2)
            counted = torch.arange(keep - 1)[None, :] >= keep - 1 - torch.tensor(tail)[:, None]
            tail_ll = (token_logp * counted).sum(1)
        cache = _output_cache(out)
        del out
        rows = [(row, choice) for row, i in enumerate(index) for choice in range(len(choices[i]))]
        rows.sort(key=lambda rc: len(choices[index[rc[0]]][rc[1]]))
        scored = {}
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            owner = torch.tensor([row for row, _ in chunk])
            ids = [choices[index[row]][choice] for row, choice in chunk]
            sums, counts = _choice_chunk(model, copy.deepcopy(cache) if first + batch_size < len(rows) else cache,
                                         owner, ids, prompt_mask, first_logp, pad, device)
            scored.update({rc: (float(s), int(n)) for rc, s, n in zip(chunk, sums, counts)})
        for row, i in enumerate(index):
            results[i] = [(*scored[(row, choice)], float(tail_ll[row])) for choice in range(len(choices[i]))]
    return results


def _shared_prefix(prompts: list[list[int]], tails: list[int] | None) -> int:
    """Length of the ids every prompt starts with, short of each prompt's scored tail and last id."""
    limit = min(len(p) - 1 - (tails[i] if tails else 0) for i, p in enumerate(prompts)) if prompts else 0
    first = prompts[0] if prompts else []
    shared = 0
    while shared < limit and all(p[shared] == first[shared] for p in prompts):
        shared += 1
    return shared


def _choice_chunk(model, cache, owner: torch.Tensor, ids: list[list[int]], prompt_mask: torch.Tensor,
                  first_logp: torch.Tensor, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood sums and token counts of choices `ids`, the choice of row k following
    prompt `owner[k]` of the batch whose KV cache is `cache` (consumed)."""
    choice_ids, choice_mask = right_pad(ids, pad)
    length = choice_ids.shape[1]
    cache.batch_select_indices(owner.to(device))
    seen = prompt_mask.sum(1)[owner]
    token_logp = torch.empty(choice_ids.shape)
    token_logp[:, 0] = first_logp[owner].gather(1, choice_ids[:, :1]).squeeze(1)
    if length > 1:
        out = model(input_ids=choice_ids[:, :-1].to(device),
                    attention_mask=torch.cat([prompt_mask[owner], choice_mask[:, :-1]], 1).to(device),
                    position_ids=(seen[:, None] + torch.arange(length - 1)).to(device),
                    use_cache=True, **{_CACHE_ARG: cache})
        rest = F.log_softmax(out.logits.float(), dim=-1)
        token_logp[:, 1:] = rest.gather(2, choice_ids[:, 1:, None].to(device)).squeeze(2).cpu()
    return (token_logp * choice_mask).sum(1), choice_mask.sum(1)


def macro_f1(gold: list[str], predicted: list[str]) -> float:
    """Unweighted mean F1 over the gold labels."""
    scores = []
    for label in sorted(set(gold)):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def majority_baseline(items: list[dict]) -> float:
    """Accuracy of the best answer-blind constant strategy: always the most common gold label
    (when it is among the choices), or always the most common gold position."""
    labels = Counter(it["choices"][it["answer"]] for it in items)
    top_label = labels.most_common(1)[0][0]
    by_label = sum(it["choices"][it["answer"]] == top_label for it in items)
    by_position = Counter(it["answer"] for it in items).most_common(1)[0][1]
    return max(by_label, by_position) / len(items)


def score_task(items: list[dict], logprobs: list[list[tuple]]) -> dict:
    """Accuracy and macro-F1, raw and length-normalized (log-likelihood per token), and where
    `logprobs` carry lm-eval's log-likelihoods, lm-eval's `acc` and `acc_norm` (per character)."""
    gold = [it["choices"][it["answer"]] for it in items]
    out = {"n": len(items), "majority_baseline": majority_baseline(items),
           "chance": sum(1 / len(it["choices"]) for it in items) / len(items)}
    for suffix, key in (("", lambda lp: lp[0]), ("_norm", lambda lp: lp[0] / lp[1])):
        picks = [max(range(len(lps)), key=lambda i: key(lps[i])) for lps in logprobs]
        predicted = [it["choices"][p] for it, p in zip(items, picks)]
        out["accuracy" + suffix] = sum(p == it["answer"] for p, it in zip(picks, items)) / len(items)
        out["macro_f1" + suffix] = macro_f1(gold, predicted)
        if suffix:  # per item, for paired comparisons of methods on the same items (efx.evaluation.paired)
            out["correct_norm"] = [int(p == it["answer"]) for p, it in zip(picks, items)]
    if logprobs and len(logprobs[0][0]) == 3:
        out.update(harness_fit.metrics(items, [[lp[2] for lp in lps] for lps in logprobs]))
    return out


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int = 256) -> dict:
    """Token-level perplexity of `texts` (each truncated to `max_length` tokens); texts of similar
    length share a batch."""
    device = _device(model)
    texts = sorted(texts, key=len)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(texts), batch_size), desc="perplexity", leave=False, unit="batch"):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target_mask = mask[:, 1:].bool()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        total_nll += float(nll[target_mask].sum())
        total_tokens += int(target_mask.sum())
    return {"perplexity": math.exp(total_nll / max(total_tokens, 1)), "tokens": total_tokens}


def evaluate(model, tokenizer, suite, *, batch_size: int = 16, split: str = "test", max_items: int | None = None,
             ppl: bool = True) -> dict:
    """Score a model on a suite.

    Returns {"tasks": {task: {accuracy, accuracy_norm, macro_f1, macro_f1_norm, acc, acc_norm,
    majority_baseline, chance, n}}, "perplexity": {perplexity, tokens} or None}.
    """
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "right"
    tasks = suite.tasks if split == "test" else suite.val
    result: dict = {"tasks": {}, "perplexity": None}
    try:
        for name, items in tasks.items():
            items = items[:max_items] if max_items else items
            logprobs = choice_logprobs(model, tokenizer, items, system=suite.system, batch_size=batch_size, desc=name,
                                       harness=True)
            result["tasks"][name] = score_task(items, logprobs)
            log.info("%s: accuracy %.3f (majority %.3f)", name, result["tasks"][name]["accuracy"],
                     result["tasks"][name]["majority_baseline"])
        if ppl and suite.ppl_texts:
            result["perplexity"] = perplexity(model, tokenizer, suite.ppl_texts, batch_size=max(1, batch_size // 2))
    finally:
        model.train(was_training)
    return result


def retention(result: dict, reference: dict, metric: str = "accuracy") -> dict:
    """Method score / reference score per task, perplexity as reference_ppl / method_ppl, and
    their mean ("overall").

    A task on which the reference does not beat its majority baseline measures nothing a pruned
    model could lose: its retention is listed under "not_meaningful" and left out of "overall".
    """
    per_task, not_meaningful = {}, []
    for name, scores in result["tasks"].items():
        ref = reference["tasks"][name]
        per_task[name] = scores[metric] / ref[metric] if ref[metric] else 0.0
        if ref[metric] <= ref["majority_baseline"]:
            not_meaningful.append(name)
    if result.get("perplexity") and reference.get("perplexity"):
        per_task["perplexity"] = reference["perplexity"]["perplexity"] / result["perplexity"]["perplexity"]
    counted = [v for name, v in per_task.items() if name not in not_meaningful]
    overall = sum(counted) / len(counted) if counted else float("nan")
    return {"per_task": per_task, "overall": overall, "metric": metric, "not_meaningful": not_meaningful}
