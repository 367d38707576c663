"""The sequential calibration pass (method.md section 2).

Capture the hidden states entering block 0; for each block, run it on the current inputs
with hooks that accumulate its targets' statistics, hand the statistics to a callback that
prunes the block, then run the block again so its pruned outputs feed the next block. Only
one block's activations and statistics are alive at a time.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

import efx_kernels
from efx.model.arch import ArchMap, BlockMap, base_linear

log = logging.getLogger(__name__)


@dataclass
class ModuleStats:
    """Input statistics of one target.

    Attributes:
        sq_sum: sum over tokens of x_j^2, fp32 (n,).
        tokens: number of (non-padding) tokens counted.
        sequences: number of sequences seen (the "paper" preset divides by it).
        hessian_sum: sum of x x^T, fp32 (n, n), when asked for.
    """

    sq_sum: torch.Tensor
    tokens: int = 0
    sequences: int = 0
    hessian_sum: torch.Tensor | None = None

    @property
    def act_sq(self) -> torch.Tensor:
        """g_j = E[x_j^2] (fp32 running mean over tokens)."""
        return self.sq_sum / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """H = E[x x^T]."""
        if self.hessian_sum is None:
            raise ValueError("the Hessian was not collected (pass hessian=True)")
        return self.hessian_sum / max(self.tokens, 1)


@dataclass
class CalibBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def as_batches(calib, batch_size: int = 8) -> list[CalibBatch]:
    """Calibration data as a list of batches: a (N, T) tensor of token ids, or an iterable of
    dicts holding `input_ids` and (optionally) `attention_mask`."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.numel() == 0:
            raise ValueError(f"calibration token ids must be a non-empty (N, T) tensor, got shape {tuple(calib.shape)}")
        return [CalibBatch(chunk, torch.ones_like(chunk)) for chunk in calib.split(batch_size)]
    batches = []
    for item in calib:
        if isinstance(item, CalibBatch):
            batches.append(item)
            continue
        ids = item["input_ids"]
        mask = item.get("attention_mask")
        batches.append(CalibBatch(ids, torch.ones_like(ids) if mask is None else mask))
    if not batches or all(int(b.attention_mask.sum()) == 0 for b in batches):
        raise ValueError("calibration data is empty")
    return batches


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model, first_block: torch.nn.Module, batches: list[CalibBatch]):
    """Hidden states entering block 0 and the keyword arguments the model passes to every block
    (attention mask, position ids, rotary embeddings, ...), one entry per batch."""
    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in batches:
            try:
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def all_reduce_stats(stats: dict[str, ModuleStats]) -> None:
    """Sum statistics over ranks so every rank scores, and masks, identically."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for s in {id(s): s for s in stats.values()}.values():  # targets that share an input share one entry
        counts = torch.tensor([s.tokens, s.sequences], dtype=torch.float64, device=s.sq_sum.device)
        torch.distributed.all_reduce(s.sq_sum)
        torch.distributed.all_reduce(counts)
        if s.hessian_sum is not None:
            torch.distributed.all_reduce(s.hessian_sum)
        s.tokens, s.sequences = int(counts[0]), int(counts[1])


@torch.no_grad()
def calibrate(model, arch: ArchMap, calib, on_block: Callable[[BlockMap, dict[str, ModuleStats]], None], *,
              hessian: bool = False, batch_size: int = 8, desc: str = "calibrating") -> None:
    """Run the sequential pass, calling `on_block(block, stats)` once per block (stats keyed by
    role) before the block's outputs are recomputed for the next block.

    LoRA adapters stay active (dropout is off in eval mode): statistics are those of the inputs
    the adapted model sees.
    """
    batches = as_batches(calib, batch_size)
    was_training = model.training
    model.eval()
    try:
        states = capture_block_inputs(model, arch.blocks[0].block, batches)
        for block_map in tqdm(arch.blocks, desc=desc, leave=False, unit="block"):
            stats = _collect(block_map, states, batches, hessian)
            all_reduce_stats(stats)
            on_block(block_map, stats)
            states = [(_run_block(block_map.block, hidden, kwargs), kwargs) for hidden, kwargs in states]
            del stats
    finally:
        model.train(was_training)


def token_mask_for(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The (batch, tokens) padding mask shaped as x's leading dimensions: some decoders (OPT's MLP,
    say) flatten the tokens to (batch * tokens, n) inside a block, in row-major order. None when
    the mask cannot belong to x."""
    if mask is None or tuple(mask.shape) == tuple(x.shape[:-1]):
        return mask
    if mask.numel() == x[..., 0].numel():
        return mask.reshape(x.shape[:-1])
    return None


def _collect(block_map: BlockMap, states, batches: list[CalibBatch], hessian: bool) -> dict[str, ModuleStats]:
    """Statistics of every target of one block over all batches. Targets that read the same input
    tensor (q, k and v; gate and up) share one ModuleStats, so one Hessian per distinct input."""
    stats: dict[str, ModuleStats] = {}
    current = {"mask": None, "sequences": 0, "last": None}
    handles = []

    def hook_for(role):
        def hook(module, args):
            x = args[0]
            last = current["last"]
            if last is not None and last[0]() is x:  # q, k, v (gate, up) read one tensor: one entry, one Hessian
                stats.setdefault(role, stats[last[1]])
                if stats[role] is stats[last[1]]:
                    return
            current["last"] = (weakref.ref(x), role)
            s = stats.get(role)
            if s is None:
                n = x.shape[-1]
                s = stats[role] = ModuleStats(torch.zeros(n, dtype=torch.float32, device=x.device),
                                              hessian_sum=torch.zeros(n, n, dtype=torch.float32, device=x.device)
                                              if hessian else None)
            mask = token_mask_for(current["mask"], x)
            s.tokens += efx_kernels.accumulate_act_sq(x, s.sq_sum, mask)
            if hessian:
                efx_kernels.accumulate_hessian(x, s.hessian_sum, mask)
            s.sequences += current["sequences"]
        return hook

    for role, module in block_map.targets.items():
        handles.append(module.register_forward_pre_hook(hook_for(role)))
    try:
        for (hidden, kwargs), batch in zip(states, batches):
            current["mask"] = batch.attention_mask.to(hidden.device)
            current["sequences"] = batch.input_ids.shape[0]
            _run_block(block_map.block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    check_stats(block_map, stats, "during calibration")
    return stats


def check_stats(block_map: BlockMap, stats: dict[str, ModuleStats], where: str) -> None:
    """Raise if a target's statistics hold NaN or Inf (one check of the sum of squares: a single
    non-finite input makes it non-finite) or if a target saw no input."""
    for role, s in stats.items():
        if not torch.isfinite(s.sq_sum).all():
            raise FloatingPointError(f"non-finite activations entering {block_map.qualified(role)} {where}")
    for role, module in block_map.targets.items():
        if role not in stats or stats[role].tokens == 0:
            n = base_linear(module).in_features
            raise RuntimeError(f"{block_map.qualified(role)} (in_features {n}) saw no input {where}")
