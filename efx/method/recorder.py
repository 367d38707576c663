"""Activation statistics recorded from the training forwards themselves (efx option).

A pruning call normally runs its own calibration pass (`efx.method.statistics`): two forwards of
every block over the calibration set, which is most of a call's time. Inside LoRA training the
model already sees thousands of domain tokens per epoch; `ActivationRecorder` accumulates each
target's `sum x_j^2` (padding excluded) during those forwards, so a call can score and run PBS
with no forward pass at all.

What changes against the sequential pass: the statistics are those of the epoch just trained
(the model under the previous call's mask, averaged over the epoch's weight updates) instead of
the current weights with this call's pruned outputs propagated block by block. Only the
diagonal statistic is recorded (E[x x^T] per step would cost as much as the layer itself), so
methods that need the Hessian keep the calibration pass. Under gradient checkpointing the
forwards recomputed in backward are counted as well: sums and token counts both double, so the
mean `E[x_j^2]` a call reads is unchanged.

Which forwards: every training forward while `active` is True. `EfficientXpertCallback` switches
it on only for the last optimizer steps before each call that hold as many sequences as the
calibration set, which cuts the recording cost in proportion and gives the statistics of the
weights nearest the call. While
`active` is False no hook is registered at all, so those steps run exactly as plain LoRA's.

Memory: every tensor the recorder keeps (the per-target sums and one column-sum buffer per input
width) is allocated when it is attached, before training starts, and `reset` zeroes them in place,
so no tensor that outlives a step is allocated between a forward's activations: the bytes in use
at a training step's peak are the same as plain LoRA's (docs/results.md, "Overhead").
"""
from __future__ import annotations

import weakref

import torch

import efx_kernels
from efx.model.arch import BlockMap, architecture_map, base_linear, unwrap
from efx.method.statistics import ModuleStats, all_reduce_stats, check_stats, token_mask_for


class ActivationRecorder:
    """Forward pre-hooks on every target of `model` that add the inputs of training-mode
    forwards (`module.training`) to per-target sums. Evaluation and calibration forwards (eval
    mode) are not counted, nor any forward while `active` is False (its hooks are detached then).
    Use `block_stats` for a pruning call, `reset` to start a new window, `remove` to detach."""

    def __init__(self, model):
        self.sums: dict[str, ModuleStats] = {}
        self._column_buffers: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._last = None  # (weak reference to the last input seen, its column sums, its token count)
        self._handles = []
        inner = unwrap(model)
        body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
        self._owners = list({id(m): m for m in (model, inner, body) if isinstance(m, torch.nn.Module)}.values())
        self._targets = []
        for block in architecture_map(model).blocks:
            for role, module in block.targets.items():
                weight = base_linear(module).weight
                self.sums[block.qualified(role)] = ModuleStats(self._zeros(weight.shape[1], weight.device))
                self._column_buffer(weight.shape[1], weight.device)
                self._targets.append((module, self._hook_for(block.qualified(role))))
        self.active = True

    @property
    def active(self) -> bool:
        """Whether training forwards are recorded; setting it attaches or detaches the hooks."""
        return bool(self._handles)

    @active.setter
    def active(self, value: bool) -> None:
        if value and not self._handles:
            self._handles = [owner.register_forward_pre_hook(self._remember_mask, with_kwargs=True)
                             for owner in self._owners]
            self._handles += [module.register_forward_pre_hook(hook) for module, hook in self._targets]
        elif not value:
            self.remove()

    @staticmethod
    def _zeros(n: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32, device=device)

    def _column_buffer(self, n: int, device: torch.device) -> torch.Tensor:
        """The held buffer the column sums of an input of width n are computed in."""
        key = (n, device)
        if key not in self._column_buffers:
            self._column_buffers[key] = self._zeros(n, device)
        return self._column_buffers[key]

    def _remember_mask(self, module, args, kwargs):
        self._mask = kwargs.get("attention_mask")
        self._last = None

    def _hook_for(self, name: str):
        def hook(module, args):
            if not module.training:
                return
            x = args[0]
            s = self.sums[name]
            delta, tokens = self._column_sums(x)
            s.sq_sum += delta
            s.tokens += tokens
            s.sequences += x.shape[0] if x.dim() > 2 else 1
        return hook

    def _column_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per-column sum of x**2 over non-padding tokens, computed once per input tensor: q, k
        and v (gate and up) receive the same tensor object, the later ones reuse the sums. The sums
        live in the held buffer of x's width until the next input of that width, which also
        replaces `_last`."""
        last = self._last
        if last is not None and last[0]() is x:
            return last[1], last[2]
        mask = token_mask_for(self._mask, x) if self._mask is not None and self._mask.dim() == 2 else None
        delta = self._column_buffer(x.shape[-1], x.device).zero_()
        with torch.no_grad():
            tokens = efx_kernels.accumulate_act_sq(x.detach(), delta, mask)
        self._last = (weakref.ref(x), delta, tokens)
        return delta, tokens

    @property
    def tokens(self) -> int:
        """Tokens recorded per target since the last reset (the largest count over targets)."""
        return max((s.tokens for s in self.sums.values()), default=0)

    def block_stats(self, block: BlockMap) -> dict[str, ModuleStats]:
        """The recorded statistics of one block's targets, keyed by role: copies, summed over the
        ranks of a distributed job, checked finite and non-empty."""
        stats = {}
        for role in block.targets:
            s = self.sums.get(block.qualified(role))
            if s is not None:
                stats[role] = ModuleStats(s.sq_sum.clone(), s.tokens, s.sequences)
        all_reduce_stats(stats)
        check_stats(block, stats, "during training")
        return stats

    def reset(self) -> None:
        """Start a new window: zero the sums in place (no tensor is allocated or freed)."""
        for s in self.sums.values():
            s.sq_sum.zero_()
            s.tokens = 0
            s.sequences = 0
        self._last = None

    def remove(self) -> None:
        """Detach every hook (what was recorded stays; `active = True` attaches them again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mask = None
        self._last = None
