"""End-to-end recipes on one budget: EfficientXpert inside LoRA training, and the two baseline
pipelines of method.md section 6."""
from __future__ import annotations

import logging
from dataclasses import replace

from efx.method import sharding
from efx.method.schedule import EfficientXpertCallback
from efx.measure import measure
from efx.data.prompts import encode_pair, right_pad
from efx.method.prune import PruneConfig
from efx.method.prune import prune as prune_model
from efx.model.arch import lora_parts
from efx.training import LoraSettings, TrainSettings, train_lora, training_subset

log = logging.getLogger(__name__)

PIPELINES = ("inside", "prune-lora-reprune", "lora-prune")


def calibration_batches(tokenizer, examples: list[dict], *, n: int = 32, max_length: int = 128, seed: int = 0,
                        system: str | None = None, batch_size: int = 8) -> list[dict]:
    """Calibration batches from domain examples (prompt + completion, as trained), right-padded
    with an attention mask so padding is excluded from the statistics."""
    rows = [encode_pair(tokenizer, ex["prompt"], ex["completion"], system, max_length)[0]
            for ex in training_subset(examples, n, seed + 1)]
    batches = []
    for start in range(0, len(rows), batch_size):
        ids, mask = right_pad(rows[start:start + batch_size], tokenizer.pad_token_id)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def unload(model):
    """The plain transformers model with the (reset or trained) adapter merged in. In a model
    sharded with FSDP2 each target is gathered, merged and written back to its shards in turn."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if not sharding.sharded_model(model):
        return model.merge_and_unload()
    for module in model.modules():
        if lora_parts(module) is not None:
            with sharding.gathered([module], {}):
                module.merge()
    return model.unload()


def prune_and_adapt(model, tokenizer, train_data: list[dict], *, prune: PruneConfig | None = None,
                    lora: LoraSettings | None = None, training: TrainSettings | None = None,
                    pipeline: str = "inside", calib=None, system: str | None = None, callback_kwargs=None,
                    work_dir=None, keep_adapter: bool = False):
    """From a general model to a sparse domain expert in one call.

    pipeline "inside" (EfficientXpert): LoRA training with pruning calls on the schedule.
    "prune-lora-reprune": prune the base, train LoRA, merge, prune again (the authors' baseline
    scripts). "lora-prune": train LoRA, merge, prune (the paper's "LoRA+Wanda").
    `work_dir` takes the files the pruning calls write (see `efx.prune`).
    `keep_adapter`: the last call prunes the base alone and the trained adapter stays unmerged
    beside it (`PruneConfig.merge` False).
    Returns (model, report): the plain merged model, or with `keep_adapter` the peft model of
    the sparse base and its adapter; the report has timings, peak memory and every call's audit.
    """
    config = prune or PruneConfig()
    config.validate()
    training = training or TrainSettings()
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r}: expected one of {PIPELINES}")
    if calib is None:
        calib = calibration_batches(tokenizer, train_data, seed=training.seed, system=system)
    record: dict = {}
    calls: list[dict] = []
    if pipeline == "inside":
        callback = EfficientXpertCallback(calib, config, work_dir=work_dir, keep_adapter=keep_adapter,
                                          **(callback_kwargs or {}))
        with measure(record, "train"):
            model, stats = train_lora(model, tokenizer, train_data, lora=lora, training=training,
                                      callbacks=[callback], system=system)
        calls = callback.reports
    else:
        final = replace(config, pbs=False, use_memory=False, merge=not keep_adapter)
        if pipeline == "prune-lora-reprune":
            with measure(record, "prune_base"):
                calls.append(prune_model(model, calib, final, work_dir=work_dir).to_dict())
        with measure(record, "train"):
            model, stats = train_lora(model, tokenizer, train_data, lora=lora, training=training, system=system)
        with measure(record, "prune_merged"):
            calls.append(prune_model(model, calib, final, work_dir=work_dir).to_dict())
    if not keep_adapter:
        model = unload(model)
    report = {"pipeline": pipeline, "keep_adapter": keep_adapter, "measure": record, "train": {k: v for k, v in stats.items() if k != "log_history"},
              "loss_history": [e for e in stats["log_history"] if "loss" in e], "calls": calls}
    return model, report
