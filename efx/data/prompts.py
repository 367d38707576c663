"""How a suite's prompt and completion become token ids, shared by training and evaluation
so both see exactly the same format."""
from __future__ import annotations

import torch


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The prompt as the model sees it: wrapped in the chat template for chat models (with the
    generation prompt appended), unchanged for base models."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt + "\n"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def completion_suffix(tokenizer) -> str:
    """What ends a completion during training: EOS (the end-of-turn token for chat models)."""
    return tokenizer.eos_token or ""


def encode_pair(tokenizer, prompt: str, completion: str, system: str | None = None,
                max_length: int | None = None, add_suffix: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + completion and the number of prompt tokens (the loss mask boundary).

    The prompt and the completion are tokenized separately so the boundary is exact; a prompt
    longer than `max_length` is cut from the left, keeping the end (the question) intact.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt, system), add_special_tokens=False)["input_ids"]
    text = completion + (completion_suffix(tokenizer) if add_suffix else "")
    completion_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
        completion_ids = completion_ids[: max(1, max_length // 2)]
        prompt_ids = prompt_ids[-(max_length - len(completion_ids)):]
    return prompt_ids + completion_ids, len(prompt_ids)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists right-padded into (ids, attention_mask) tensors of shape (len(rows), longest)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask
