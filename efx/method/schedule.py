"""EfficientXpert inside LoRA training (method.md section 5): a transformers TrainerCallback
that prunes on a schedule and ends with a merged, exactly sparse model, or with an exactly
sparse base and the trained adapter beside it."""
from __future__ import annotations

import logging
import math
from dataclasses import replace

from transformers import TrainerCallback

from efx.method.recorder import ActivationRecorder
from efx.method.prune import CARRIED, PruneConfig, prune
from efx.method.score_memory import CarriedTensors, PruneMemory

log = logging.getLogger(__name__)

STATISTICS = ("calibration", "training")
SCHEDULES = ("epoch", "steps", "ramp")
RAMP_END = 2 / 3  # the fraction of training at which the ramp reaches the target sparsity
RAMP_CALLS = 4  # about the ramp's calls when no interval is given (every 10 steps of a 60-step run)
CALIBRATION_SEQUENCES = 32  # what "training" statistics record before a call when no calibration set is given


def record_window(sequences: int, per_step: int) -> int:
    """Optimizer steps of `per_step` sequences that hold `sequences` sequences."""
    return max(math.ceil(sequences / per_step), 1)


class EfficientXpertCallback(TrainerCallback):
    """Prune during training.

    Schedule "epoch" (the authors'): one call at the start of every epoch after the first.
    Schedule "steps": one call every `every_steps` optimizer steps.
    Schedule "ramp" (efx option, gradual pruning): one call every `every_steps` steps up to two
    thirds of training (without `every_steps`: every round(2/3 * steps / 4) steps, about 4
    calls), at the cubic sparsity s_f * (1 - (1 - t / t_end)^3) of gradual magnitude pruning
    (Zhu & Gupta, 2017), reaching the target at the last of them; these calls prune the base
    alone (`PruneConfig.merge` False: no PBS, no merge), so one adapter trains on the ever sparser
    base for the whole budget and the score memory blends the calls' scores. An N:M pattern has
    one sparsity, so its ramp is a single cut of the base at the first call; the adapter then
    trains on the N:M base for the rest of the budget. What `efx run` does with the efx preset.
    Whatever the schedule a final call at train end runs without PBS and without score memory,
    so the model ends merged and exactly sparse (the adapter is reset to B = 0;
    `merge_and_unload()` then yields the plain model).
    With `keep_adapter` the final call prunes the base alone and leaves the trained adapter
    unmerged beside it (`PruneConfig.merge` False).

    Args:
        calib: calibration data (see `efx.method.prune`); may be None with statistics="training".
        config: the pruning settings of the intermediate calls.
        schedule: "epoch", "steps" or "ramp".
        every_steps: interval of the "steps" (required) and "ramp" schedules.
        reset_optimizer: clear the optimizer state after each call that re-initializes the
            adapter (the authors keep it); not with the ramp, whose calls keep the adapter.
        statistics: "calibration" (each call runs the sequential calibration pass of method.md
            section 2) or "training" (each call uses the activation statistics recorded during
            the training forwards of the last optimizer steps before it that hold as many
            sequences as the calibration set, or 32 without one: no extra forward pass, and the
            statistics of the weights nearest the call; see `efx.method.recorder`; not for
            methods that need the Hessian). Where the epoch length is unknown (a training set
            without a length), every step of the epoch schedule is recorded.
        work_dir: folder for the files the calls write (score memory, previous masks, undo); None:
            the system's temporary folder. Removed at train end.
        keep_adapter: end with the base pruned and the adapter trained since the last
            intermediate call kept, unmerged (for serving or evaluating base + adapter).
    """

    def __init__(self, calib, config: PruneConfig | None = None, *, schedule: str = "epoch",
                 every_steps: int | None = None, reset_optimizer: bool = False,
                 statistics: str = "calibration", work_dir=None, keep_adapter: bool = False):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r}: expected one of {SCHEDULES}")
        if schedule == "steps" and not every_steps:
            raise ValueError(f"schedule {schedule!r} needs every_steps > 0")
        if every_steps is not None and every_steps <= 0:
            raise ValueError(f"every_steps {every_steps} must be positive")
        if schedule == "ramp" and reset_optimizer:
            raise ValueError("reset_optimizer clears the optimizer state of a re-initialized adapter; the ramp's "
                             "calls keep the adapter (schedule 'epoch' or 'steps' re-initialize it)")
        if statistics not in STATISTICS:
            raise ValueError(f"statistics {statistics!r}: expected one of {STATISTICS}")
        if statistics == "calibration" and calib is None:
            raise ValueError("statistics 'calibration' needs calibration data (calib is None)")
        self.calib = calib
        self.config = config or PruneConfig()
        self.config.validate()
        if statistics == "training" and self.config.needs_hessian:
            raise ValueError(f"statistics 'training' records no Hessian E[x x^T], which method "
                             f"{self.config.method!r} with these options needs")
        self.schedule = schedule
        self.every_steps = every_steps
        self.interval: int | None = every_steps  # steps between calls in this training (set when it starts)
        self.reset_optimizer = reset_optimizer
        self.statistics = statistics
        self.record_sequences = CALIBRATION_SEQUENCES if calib is None else \
            sum(len(batch["input_ids"]) for batch in calib)
        self.record_steps: int | None = None  # the window in optimizer steps, set when training starts
        self.keep_adapter = keep_adapter
        self._epoch_end: int | None = None  # global step at which the current epoch ends
        self.recorder: ActivationRecorder | None = None
        self.work_dir = work_dir
        self.memory = PruneMemory(CarriedTensors(folder=work_dir), CarriedTensors(folder=work_dir))
        self.reports: list[dict] = []

    def _call(self, model, optimizer, config: PruneConfig, when: str, final: bool = False,
              another_follows: bool = True) -> None:
        """One call. The final call carries nothing to a next one; the last intermediate call
        (`another_follows` False) carries its masks but not its scores, which the final call,
        running without score memory, would not read."""
        recorded = self.recorder if self.recorder is not None and self.recorder.tokens else None
        carry = () if final else (CARRIED if another_follows else ("masks",))
        report = prune(model, self.calib, config, memory=self.memory, recorded=recorded, carry=carry,
                       work_dir=self.work_dir)
        if self.recorder is not None:
            self.recorder.reset()
        entry = report.to_dict()
        entry["when"] = when
        self.reports.append(entry)
        if self.reset_optimizer and optimizer is not None:
            optimizer.state.clear()
        model.train()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.schedule == "ramp" and self.every_steps is None:
            self.interval = max(round(RAMP_END * state.max_steps / RAMP_CALLS), 1)
        if self.statistics == "training":
            self.record_steps = record_window(self.record_sequences,
                                              args.per_device_train_batch_size * args.gradient_accumulation_steps)
            if self.recorder is not None:
                self.recorder.remove()
            self.recorder = ActivationRecorder(model)

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        try:
            batches = len(train_dataloader)
        except TypeError:  # None, or a loader without a length
            self._epoch_end = None
        else:  # optimizer steps per epoch, as the Trainer counts them (a resumed run may start mid-epoch)
            per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
            self._epoch_end = min((state.global_step // per_epoch + 1) * per_epoch, state.max_steps)
        if self.schedule == "epoch" and state.epoch is not None and round(state.epoch) >= 1:
            last_epoch = self._epoch_end is not None and self._epoch_end >= state.max_steps
            self._call(model, optimizer, self.config, f"epoch {round(state.epoch) + 1} start",
                       another_follows=not last_epoch)

    def _ramp_end(self, state) -> int:
        """The step of the ramp's last call (a multiple of the interval, at least the first; the first
        for an N:M pattern, whose one cut is the whole ramp)."""
        if self.config.pattern != "unstructured":
            return self.interval
        return max(int(RAMP_END * state.max_steps) // self.interval, 1) * self.interval

    def _next_call_step(self, state) -> int | None:
        """The global step after which the next call runs (None: unknown)."""
        if self.schedule == "epoch":
            return self._epoch_end
        step = math.ceil((state.global_step + 1) / self.interval) * self.interval
        if self.schedule == "ramp" and step > self._ramp_end(state):
            return state.max_steps
        return min(step, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.recorder is not None:
            end = self._next_call_step(state)
            self.recorder.active = end is None or end - state.global_step <= self.record_steps

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if self.schedule == "steps" and step % self.interval == 0 and step < state.max_steps:
            self._call(model, optimizer, self.config, f"step {step}",
                       another_follows=step + self.interval < state.max_steps)
        if self.schedule == "ramp" and step % self.interval == 0 and step <= self._ramp_end(state) \
                and step < state.max_steps:
            end = self._ramp_end(state)
            sparsity = self.config.sparsity * (1 - (1 - step / end) ** 3)
            self._call(model, optimizer, replace(self.config, sparsity=sparsity, merge=False, pbs=False),
                       f"step {step}", another_follows=step < end)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        final = replace(self.config, pbs=False, use_memory=False, merge=not self.keep_adapter)
        try:
            self._call(model, optimizer, final, "train end", final=True)
        finally:
            if self.recorder is not None:
                self.recorder.remove()
                self.recorder = None
            self.memory.scores.close()
            self.memory.masks.close()
        model.eval()
