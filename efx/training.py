"""Dense LoRA fine-tuning through peft and the transformers Trainer, with completion-only loss.
Pruning plugs in as a Trainer callback (efx.method.schedule)."""
from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from efx.data.prompts import encode_pair, right_pad

log = logging.getLogger(__name__)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """The adapter (defaults: method.md section 5)."""

    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the scale is alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter input during training."""
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    """Module name suffixes to adapt."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r)."""


@dataclass
class TrainSettings:
    """The training budget. The default fits the embedded model on a 2-core CPU in minutes."""

    epochs: int = 3
    """Passes over the training subset (EfficientXpert prunes at the start of epochs 2..E)."""
    n_examples: int = 240
    """Training examples drawn (seeded) from the suite's training pool; 0 = all."""
    batch_size: int = 8
    """Examples per forward on each device; an optimizer step takes batch_size * grad_accum of them."""
    grad_accum: int = 1
    """Forwards whose gradients are accumulated into one optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (less memory, about
    a third more time)."""
    learning_rate: float = 2e-4
    """Peak learning rate (linear decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_length: int = 160
    """Tokens per example (prompt cut from the left beyond it)."""
    seed: int = 0
    """Seed of the data order, adapter initialization and dropout."""
    logging_steps: int = 10
    """Log the training loss every this many steps."""
    extra_args: dict = field(default_factory=dict)
    """More `transformers.TrainingArguments` fields (e.g. gradient_accumulation_steps)."""


class CompletionDataset(Dataset):
    """Tokenized prompt/completion pairs; labels are -100 on the prompt (completion-only loss)."""

    def __init__(self, tokenizer, examples: list[dict], system: str | None, max_length: int):
        self.rows = []
        for example in examples:
            ids, n_prompt = encode_pair(tokenizer, example["prompt"], example["completion"], system, max_length)
            self.rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def pad_collate(pad_id: int):
    """Right-pad a batch of {input_ids, labels} into tensors with an attention mask."""
    def collate(rows: list[dict]) -> dict:
        ids, mask = right_pad([r["input_ids"] for r in rows], pad_id)
        labels, _ = right_pad([r["labels"] for r in rows], -100)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return collate


def completion_loss(model, inputs: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens, computing vocabulary logits only
    at the positions that predict a completion token (the LM head is a large share of a small
    model's cost, and most positions are prompt)."""
    from efx.method.sharding import sharded_model
    from efx.model.arch import unwrap

    inner = unwrap(model)
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = getattr(inner, "lm_head", None)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or body is None or head is None \
            or sharded_model(inner):
        # DDP and FSDP must see the root's own forward; generic models use their loss
        return model(**inputs).loss
    labels = inputs["labels"]
    hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    chosen = targets != -100
    logits = head(hidden[:, :-1][chosen]).float()
    return torch.nn.functional.cross_entropy(logits, targets[chosen])


def add_lora(model, lora: LoraSettings, seed: int = 0):
    """Wrap `model` with a fresh peft LoRA adapter on `lora.target_modules`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), use_rslora=lora.rslora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def training_subset(examples: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of `n` examples (all when n is 0 or larger than the pool)."""
    if not examples:
        raise ValueError("no training examples")
    if not n or n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, n)


def _trainer_class():
    from transformers import Trainer

    class CompletionTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return completion_loss(model, inputs)

    return CompletionTrainer


def train_lora(model, tokenizer, examples: list[dict], *, lora: LoraSettings | None = None,
               training: TrainSettings | None = None, callbacks=(), system: str | None = None):
    """Fine-tune `model` with LoRA on prompt/completion `examples`.

    A model already wrapped by peft keeps its adapter. Returns (peft model, stats) with the
    Trainer's log history and the number of steps.

    Precision follows the model: a bf16 (fp16) model trains with the Trainer's bf16 (fp16) autocast,
    and peft keeps the LoRA factors in fp32 (its `autocast_adapter_dtype`), as peft and the
    Trainer do by default; an fp32 model trains in fp32. The device is the model's.
    """
    from transformers import TrainingArguments, set_seed

    lora = lora or LoraSettings()
    training = training or TrainSettings()
    set_seed(training.seed)
    if not hasattr(model, "peft_config"):
        model = add_lora(model, lora, training.seed)
    data = CompletionDataset(tokenizer, training_subset(examples, training.n_examples, training.seed), system,
                             training.max_length)
    base = next(model.parameters())
    precision = {torch.bfloat16: {"bf16": True}, torch.float16: {"fp16": True}}.get(
        next((p.dtype for p in model.parameters() if not p.requires_grad), base.dtype), {})
    checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} \
        if training.gradient_checkpointing else {}
    with tempfile.TemporaryDirectory(prefix="efx-train-") as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=training.epochs, per_device_train_batch_size=training.batch_size,
            learning_rate=training.learning_rate, weight_decay=training.weight_decay, lr_scheduler_type="linear",
            logging_steps=training.logging_steps, save_strategy="no", report_to=[], seed=training.seed,
            data_seed=training.seed, remove_unused_columns=False, dataloader_num_workers=0,
            gradient_accumulation_steps=training.grad_accum, use_cpu=base.device.type == "cpu",
            **precision, **checkpointing, **training.extra_args)
        trainer = _trainer_class()(model=model, args=args, train_dataset=data,
                          data_collator=pad_collate(tokenizer.pad_token_id), callbacks=list(callbacks))
        output = trainer.train()
    model.eval()
    stats = {"steps": output.global_step, "train_loss": output.training_loss, "n_examples": len(data),
             "log_history": trainer.state.log_history}
    log.info("trained %d steps, mean loss %.4f", output.global_step, output.training_loss)
    return model, stats
