"""EfficientXpert inside LoRA training (method.md section 5): a transformers TrainerCallback
that prunes on a schedule and ends with a merged, exactly sparse model."""
from __future__ import annotations

import logging
from dataclasses import replace

from transformers import TrainerCallback

from efx import masked_adapter
from efx.arch import architecture_map
from efx.prune import PruneConfig, PruneMemory, prune

log = logging.getLogger(__name__)


class EfficientXpertCallback(TrainerCallback):
    """Prune during training.

    Schedule "epoch" (the authors'): one call at the start of every epoch after the first.
    Schedule "steps": one call every `every_steps` optimizer steps. Either way a final call at
    train end runs without PBS and without score memory, so the model ends merged and exactly
    sparse (the adapter is reset to B = 0; `merge_and_unload()` then yields the plain model).

    Args:
        calib: calibration data (see `efx.prune`).
        config: the pruning settings of the intermediate calls.
        schedule: "epoch" or "steps".
        every_steps: interval of the "steps" schedule.
        reset_optimizer: clear the optimizer state after each call (the authors keep it).
        masked_adapter: between calls, mask the adapter delta with the last call's keep-masks, so
            the effective weight stays sparse while training and the final call loses nothing
            (see `efx.masked_adapter`; the authors leave the delta dense).
    """

    def __init__(self, calib, config: PruneConfig | None = None, *, schedule: str = "epoch",
                 every_steps: int | None = None, reset_optimizer: bool = False, masked_adapter: bool = False):
        if schedule not in ("epoch", "steps"):
            raise ValueError(f"schedule {schedule!r}: expected 'epoch' or 'steps'")
        if schedule == "steps" and not every_steps:
            raise ValueError("schedule 'steps' needs every_steps > 0")
        self.calib = calib
        self.config = config or PruneConfig()
        self.config.validate()
        self.schedule = schedule
        self.every_steps = every_steps
        self.reset_optimizer = reset_optimizer
        self.masked_adapter = masked_adapter
        self.memory = PruneMemory()
        self.reports: list[dict] = []

    def _call(self, model, optimizer, config: PruneConfig, when: str, final: bool = False) -> None:
        arch = architecture_map(model)
        masked_adapter.fold(arch)  # no-op unless the adapter is masked
        report = prune(model, self.calib, config, memory=self.memory)
        if self.masked_adapter and not final:
            masked_adapter.attach(arch, self.memory.masks)
        entry = report.to_dict()
        entry["when"] = when
        self.reports.append(entry)
        if self.reset_optimizer and optimizer is not None:
            optimizer.state.clear()
        model.train()

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.schedule == "epoch" and state.epoch is not None and round(state.epoch) >= 1:
            self._call(model, optimizer, self.config, f"epoch {round(state.epoch) + 1} start")

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.schedule == "steps" and state.global_step % self.every_steps == 0 \
                and state.global_step < state.max_steps:
            self._call(model, optimizer, self.config, f"step {state.global_step}")

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        final = replace(self.config, pbs=False, use_memory=False)
        self._call(model, optimizer, final, "train end", final=True)
        model.eval()
