"""One pruning call (method.md sections 3-5): score every target, optionally update B with
Partial Brain Surgeon, merge s*B@A into W, apply the mask and re-initialize the adapter.

A call is all or nothing: inputs are checked before any weight changes, and if anything
fails during the pass every touched tensor is restored.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import efx_kernels
from efx.method import baselines, sharding
from efx.method.foresight import (PRESETS, activation_statistic, foresight_score, parse_pattern, score_inputs,
                                  select_keep_mask)
from efx.method.pbs import all_finite, hessian_pbs, partial_brain_surgeon
from efx.method.score_memory import CarriedTensors, PruneMemory, mask_overlap, pack_mask
from efx.method.statistics import ModuleStats, as_batches, calibrate
from efx.model.arch import ROLES, ArchMap, BlockMap, architecture_map, base_linear, lora_parts, reset_lora

log = logging.getLogger(__name__)

FORESIGHT_METHODS = ("efficientxpert", "foresight")  # scored by ForeSight, pruned inside training
METHODS = (*FORESIGHT_METHODS, "wanda", "magnitude", "sparsegpt")
ROLE_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                "down_proj": "down"}


@dataclass
class PruneConfig:
    """Settings of a pruning call."""

    method: str = "efficientxpert"
    """efficientxpert (ForeSight + PBS), foresight (no PBS), wanda, magnitude or sparsegpt."""
    sparsity: float = 0.4
    """Fraction of each target's weights removed (unstructured); N:M patterns fix it at 1 - N/M."""
    pattern: str = "unstructured"
    """"unstructured", or "N:M" such as "2:4" and "4:8"."""
    preset: str = "efx"
    """ForeSight/PBS preset: "efx" (method.md's corrected form) or "paper" (the authors' code)."""
    pbs: bool | None = None
    """Run Partial Brain Surgeon before the merge; None = on for efficientxpert only."""
    pbs_keep_weight: float = 1.0
    """PBS weight on the drift of kept coordinates."""
    pbs_ridge: float = 1e-8
    """PBS ridge term."""
    pbs_max_pruned_per_row: int | None = None
    """Limit PBS to the c largest pruned weights of each row."""
    pbs_hessian: bool = False
    """Use Hessian PBS (full E[x x^T]) instead of the diagonal objective."""
    reconstruct: bool = False
    """ForeSight methods: after the mask is chosen, update the kept weights of what is pruned (the
    merged W + s*B@A, or W alone without a merge) by SparseGPT's OBS solve under that mask, instead
    of PBS. At an N:M pattern the solve also chooses each group's keeps (SparseGPT's rule: the OBS
    error on the weights updated so far), where ForeSight's row-constant factors would leave
    |U| * sqrt(E[x^2]). Needs E[x x^T] (a calibration pass)."""
    mask_lr: float = 0.5
    """eta of the score memory S_t = eta*I_t + (1-eta)*S_{t-1}."""
    use_memory: bool = True
    """Blend with the previous call's scores (the final call of a schedule turns it off)."""
    targets: tuple[str, ...] | None = None
    """Roles (q, k, v, o, gate, up, down) or projection names to prune; None = all mapped targets."""
    sparsegpt_block: int = 128
    """SparseGPT columns per block."""
    sparsegpt_damp: float = 0.01
    """SparseGPT dampening, fraction of the mean Hessian diagonal."""
    calib_batch_size: int = 8
    """Sequences per calibration forward."""
    seed: int = 0
    """Seed of the adapter re-initialization (identical on every rank)."""
    merge: bool = True
    """Merge s*B@A into W and re-initialize the adapter. False: prune W alone and leave the
    adapter as it is, beside the sparse base and unmerged (the form peft, vLLM with LoRA and
    lm-eval's `peft=` load). The score is then taken on W, which is what gets pruned; PBS, which
    exists to prepare a merge, does not run."""

    @property
    def run_pbs(self) -> bool:
        default = self.method == "efficientxpert" and not self.reconstruct
        return self.merge and (default if self.pbs is None else self.pbs)

    @property
    def needs_hessian(self) -> bool:
        """True when the call needs E[x x^T] (SparseGPT, Hessian PBS, the reconstruction)."""
        return self.method == "sparsegpt" or self.reconstruct or (self.run_pbs and self.pbs_hessian)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {METHODS}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity {self.sparsity!r} is outside [0, 1)")
        parse_pattern(self.pattern)
        if self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r}: expected one of {PRESETS}")
        if not 0.0 < self.mask_lr <= 1.0:
            raise ValueError(f"mask_lr {self.mask_lr} is outside (0, 1]")
        if not 0.0 <= self.pbs_keep_weight <= 1.0:
            raise ValueError(f"pbs_keep_weight {self.pbs_keep_weight} is outside [0, 1] (above 1 the per-row "
                             "Grams can be indefinite)")
        if self.pbs_ridge < 0:
            raise ValueError(f"pbs_ridge {self.pbs_ridge} must be >= 0")
        if self.pbs_max_pruned_per_row is not None and (isinstance(self.pbs_max_pruned_per_row, bool) or not
                                                        isinstance(self.pbs_max_pruned_per_row, int) or
                                                        self.pbs_max_pruned_per_row <= 0):
            raise ValueError(f"pbs_max_pruned_per_row {self.pbs_max_pruned_per_row!r}: expected a positive integer "
                             "or None")
        if self.preset == "paper" and self.pattern != "unstructured":
            raise ValueError("preset 'paper' reproduces the authors' code, which prunes unstructured only; got "
                             f"pattern {self.pattern!r}")
        if self.calib_batch_size <= 0:
            raise ValueError(f"calib_batch_size {self.calib_batch_size} must be positive")
        if not self.merge and self.pbs:
            raise ValueError("merge=False keeps the adapter unmerged; PBS prepares a merge (set pbs=False)")
        if self.reconstruct and self.method not in FORESIGHT_METHODS:
            raise ValueError(f"reconstruct updates the weights kept by a ForeSight mask; method {self.method!r} "
                             "(sparsegpt reconstructs by itself)")
        if self.reconstruct and self.pbs:
            raise ValueError("reconstruct and pbs both update what a merge keeps; choose one")

    @property
    def effective_sparsity(self) -> float:
        nm = parse_pattern(self.pattern)
        return self.sparsity if nm is None else 1.0 - nm[0] / nm[1]


@dataclass
class PruneReport:
    """Per-module audit of one call."""

    config: dict
    modules: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    call: int = 0

    @property
    def sparsity(self) -> float:
        total = sum(m["total"] for m in self.modules.values())
        return sum(m["total"] - m["kept"] for m in self.modules.values()) / max(total, 1)

    @property
    def mask_overlap(self) -> float | None:
        values = [m["overlap_prev"] for m in self.modules.values() if m["overlap_prev"] is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict:
        return {"call": self.call, "sparsity": self.sparsity, "mask_overlap": self.mask_overlap,
                "seconds": self.seconds, "config": self.config, "modules": self.modules}


def _selected_roles(arch: ArchMap, targets) -> list[str]:
    available = list(arch.roles)
    if targets is None:
        return available
    roles = [ROLE_ALIASES.get(t, t) for t in targets]
    unknown = [t for t, r in zip(targets, roles) if r not in available]
    if unknown:
        raise ValueError(f"targets {unknown} match no module; this model's targets are {available}")
    order = ROLES if arch.supported else available
    return [r for r in order if r in roles]


def _check_adapter_kind(model) -> None:
    """Refuse the peft adapters whose merge or re-initialization a pruning call cannot do as peft
    would: DoRA (its magnitude vector rescales the merged weight) and initializations other than
    peft's default (a call re-initializes A Kaiming-uniform, B = 0)."""
    for name, adapter in (getattr(model, "peft_config", None) or {}).items():
        if getattr(adapter, "use_dora", False):
            raise ValueError(f"adapter {name!r} uses DoRA, whose magnitude vector a pruning call would ignore; "
                             "efx prunes plain LoRA adapters")
        init = getattr(adapter, "init_lora_weights", True)
        if init is not True:
            raise ValueError(f"adapter {name!r} has init_lora_weights={init!r}; a pruning call re-initializes the "
                             "adapter as peft's default does (True: A Kaiming-uniform, B = 0), so only that is "
                             "supported")


def _preflight(model, arch: ArchMap, roles: list[str], config: PruneConfig) -> None:
    _check_adapter_kind(model)
    nm = parse_pattern(config.pattern)
    for block in arch.blocks:
        for role in roles:
            module = block.targets[role]
            weight = base_linear(module).weight
            if nm is not None and weight.shape[1] % nm[1]:
                raise ValueError(f"{block.qualified(role)}: in_features {weight.shape[1]} is not divisible by "
                                 f"M={nm[1]} of pattern {config.pattern}")
            tensors = [("weight", weight)]
            parts = lora_parts(module)
            if parts is not None:
                tensors += [("lora_A", parts[0]), ("lora_B", parts[1])]
                if parts[0].device != weight.device:
                    raise ValueError(f"{block.qualified(role)}: adapter and weight are on different devices")
            for name, t in tensors:
                if sharding.is_sharded(t):  # this rank's shard, the verdict agreed by all ranks
                    finite = sharding.on_every_rank(all_finite(t.to_local()))
                else:
                    finite = all_finite(t)
                if not finite:
                    raise ValueError(f"{block.qualified(role)}.{name} holds NaN or Inf")


CARRIED = ("scores", "masks")


@torch.no_grad()
def prune(model, calib, config: PruneConfig | None = None, *, memory: PruneMemory | None = None,
          recorded=None, carry: tuple[str, ...] | str = CARRIED, work_dir: str | Path | None = None) -> PruneReport:
    """Prune every target of `model` (plain or peft-wrapped) to `config.sparsity`.

    Args:
        model: a causal LM of a mapped architecture, with or without a LoRA adapter.
        calib: (N, T) token ids, or an iterable of batches with `input_ids` and `attention_mask`;
            None with `recorded`.
        config: the call's settings.
        memory: carried between the calls of a schedule (score memory, previous masks); a call
            without it keeps nothing.
        recorded: an `efx.method.recorder.ActivationRecorder` attached to `model`: take the
            statistics it recorded during training instead of running a calibration pass.
        carry: what this call leaves in `memory` for the next one: "scores" (its blended scores,
            with `config.use_memory`) and "masks" (its keep-masks, which the next call's overlap
            and the masked adapter read); one name alone may be passed as a string. What is not
            carried is dropped from `memory`, and its bytes are never written: a schedule passes
            less where the next call reads less.
        work_dir: folder for the undo files: the original of every tensor the call changes is
            written there before the change, so that a failure can restore it without a
            model-sized copy in memory (None: the system's temporary folder). Removed when the
            call ends, whether it succeeds or fails.
    Returns:
        PruneReport with per-module sparsity, overlap with the previous call's mask, and timings.
    """
    config = config or PruneConfig()
    config.validate()
    carry = (carry,) if isinstance(carry, str) else tuple(carry)
    unknown = set(carry) - set(CARRIED)
    if unknown:
        raise ValueError(f"carry {sorted(unknown)}: expected a subset of {CARRIED}")
    arch = architecture_map(model)
    roles = _selected_roles(arch, config.targets)
    _preflight(model, arch, roles, config)
    if recorded is None:
        if calib is None:
            raise ValueError("no calibration data (calib is None) and no recorded statistics")
        batches = as_batches(calib, config.calib_batch_size)
    elif config.needs_hessian:
        raise ValueError("statistics recorded during training hold no Hessian E[x x^T], which "
                         f"method {config.method!r} with these options needs: use a calibration pass")
    elif recorded.tokens == 0:
        raise ValueError("the activation recorder holds no statistics: no training forward ran since its last reset")
    if recorded is None and sharding.sharded_model(model):
        raise ValueError("a model sharded with FSDP2 is pruned with the statistics recorded during training "
                         "(statistics 'training'); the calibration pass runs blocks on their own, outside the "
                         "sharded forward")
    if memory is None:  # a call on its own: nothing reads what it would carry, so nothing is kept or written
        memory, carry = PruneMemory(scores=CarriedTensors(offload=False), masks=CarriedTensors(offload=False)), ()
    call = _Call(arch, config, memory, PruneReport(config=asdict(config), call=memory.calls + 1),
                 torch.Generator().manual_seed(config.seed * 1_000_003 + memory.calls),
                 keep_scores=config.use_memory and "scores" in carry, keep_masks="masks" in carry,
                 undo=CarriedTensors(offload=True, folder=work_dir))
    report = call.report

    def on_block(block, stats):
        # a sharded model: the block's targets are gathered whole, and their new values written
        # back to every rank's shards when the block is done (a no-op for a plain model)
        with sharding.gathered(block.targets.values(), call.shards):
            for role in roles:
                start = time.perf_counter()
                _prune_module(call, block, role, stats[role])
                report.modules[block.qualified(role)]["seconds"] = time.perf_counter() - start

    started = time.perf_counter()
    try:
        if recorded is None:
            calibrate(model, arch, batches, on_block, hessian=config.needs_hessian, batch_size=config.calib_batch_size,
                      desc=f"pruning ({config.method})")
        else:
            for block in arch.blocks:
                on_block(block, recorded.block_stats(block))
    except BaseException:
        call.undo.commit()
        for index, target in reversed(list(enumerate(call.changed))):
            if id(target) in call.shards:  # a gathered tensor: its shard is what the model holds
                target = call.shards[id(target)].to_local()
            target.copy_(call.undo.get(str(index)).to(target.device))
        memory.scores.discard()
        memory.masks.discard()
        log.error("pruning failed; every modified weight was restored")
        raise
    finally:
        log.info("pruning call %d: %.1f MB of undo files in %s (removed)", report.call,
                 sum(t.numel() * t.element_size() for t in call.changed) / 2**20, call.undo.folder)
        call.undo.close()
        efx_kernels.release_buffers()  # the CPU PBS buffers are for the calls of one pass
    for store, kept in ((memory.scores, call.keep_scores), (memory.masks, call.keep_masks)):
        if kept:
            store.commit()
        else:
            store.clear()
    if call.keep_scores or call.keep_masks:
        log.info("pruning call %d carries %.1f MB to the next call (%s)", report.call,
                 (memory.scores.nbytes + memory.masks.nbytes) / 2**20,
                 memory.scores.folder or "in memory")
    memory.calls += 1
    report.seconds = time.perf_counter() - started
    log.info("pruning call %d: sparsity %.4f in %.1f s", report.call, report.sparsity, report.seconds)
    return report


@dataclass
class _Call:
    """What every target of one call shares."""

    arch: ArchMap
    config: PruneConfig
    memory: PruneMemory
    report: PruneReport
    generator: torch.Generator
    keep_scores: bool
    keep_masks: bool
    undo: CarriedTensors
    changed: list[torch.Tensor] = field(default_factory=list)  # undo entry i is the original of changed[i]
    shards: dict = field(default_factory=dict)  # id of a gathered full tensor -> its sharded parameter


def _prune_module(call: _Call, block: BlockMap, role: str, stats: ModuleStats) -> None:
    """Score, update, merge, mask and re-initialize one target; its tensors go to `call.undo` first."""
    config, memory, name, module = call.config, call.memory, block.qualified(role), block.targets[role]
    weight = base_linear(module).weight
    parts = lora_parts(module) if config.merge else None  # without a merge the adapter is left alone
    A, B, scale = parts if parts is not None else (None, None, 0.0)
    for tensor in (weight,) + ((A, B) if parts else ()):
        sharded = call.shards.get(id(tensor))  # a gathered tensor: the undo keeps this rank's shard only
        call.undo.stage(str(len(call.changed)), tensor if sharded is None else sharded.to_local())
        call.changed.append(tensor)
    nm = parse_pattern(config.pattern)
    sparsity = config.effective_sparsity
    merged = None  # the new W, when SparseGPT's solve forms it
    if config.method == "sparsegpt" or (config.reconstruct and nm is not None):
        # the solver below chooses it: at N:M ForeSight's factors are constant within a group (row
        # granularity), so its choice there is |U| * sqrt(E[x^2]); with the rebuild's E[x x^T] at hand
        # the OBS error on the progressively updated weights chooses instead (retention grid, 2:4)
        keep = None
    elif config.method in FORESIGHT_METHODS and nm is not None and not config.use_memory:
        # no score to remember: the fused kernel goes straight from weights to the N:M mask
        keep = efx_kernels.foresight_nm_keep_mask(**score_inputs(call.arch, block, role, stats, config.preset,
                                                                 config.merge), n=nm[0], m=nm[1])
    elif config.method in FORESIGHT_METHODS:
        sharded = call.shards.get(id(weight))  # a sharded model: each rank keeps its shard of the score
        prev = memory.scores.get(name) if config.use_memory else None
        if prev is not None and sharded is not None:
            prev = sharding.gather_like(prev, sharded)
        score = foresight_score(call.arch, block, role, stats, config.preset, prev=prev, eta=config.mask_lr,
                                adapter=config.merge)
        if call.keep_scores:
            kept_score = score if sharded is None else sharding.shard_like(score, sharded)
            memory.scores.stage(name, kept_score.to(torch.bfloat16))
        keep = select_keep_mask(score, sparsity, config.pattern)
        del score, prev  # 4 + 2 bytes per weight that the merge below does not need
    else:
        U = efx_kernels.effective_weight(weight, A, B, scale)
        score = baselines.magnitude_score(U) if config.method == "magnitude" else \
            baselines.wanda_score(U, stats.act_sq, stats.tokens)
        keep = select_keep_mask(score, sparsity, config.pattern)
        del U, score

    if config.method == "sparsegpt" or config.reconstruct:
        # SparseGPT's OBS solve: its own mask (also for reconstruct at N:M), or the rebuild under the ForeSight mask
        merged, keep = baselines.sparsegpt(efx_kernels.effective_weight(weight, A, B, scale), stats.hessian,
                                           sparsity, config.pattern, config.sparsegpt_block, config.sparsegpt_damp,
                                           keep=keep)
    if merged is None:
        if parts is not None and config.run_pbs:
            B = _pbs_update(weight, A, B, scale, keep, stats, config)
        # x * 0 is -0.0 for negative x: adding +0.0 makes every pruned weight exactly +0.0
        merged = efx_kernels.effective_weight(weight, A, B, scale).mul_(keep.view(torch.uint8)).add_(0.0)
    weight.copy_(merged)  # converts to W's dtype without a second copy
    del merged
    if parts is not None:
        reset_lora(parts[0], parts[1], call.generator)
    kept = int(keep.count_nonzero())
    packed = pack_mask(keep)
    if call.keep_masks:
        memory.masks.stage(name, packed)
    call.report.modules[name] = {
        "role": role, "block": block.index, "shape": list(weight.shape), "kept": kept, "total": keep.numel(),
        "sparsity": 1.0 - kept / keep.numel(),
        # a bool count: counting a float tensor's nonzeros directly is ~3x slower on CPUs
        "zeros": weight.numel() - int((weight != 0).count_nonzero()),
        "overlap_prev": mask_overlap(memory.masks.get(name), packed, keep.numel())}


def _pbs_update(weight, A, B, scale: float, keep: torch.Tensor, stats: ModuleStats, config: PruneConfig):
    """The new B of Partial Brain Surgeon under `keep` (diagonal, Hessian, or the authors' form)."""
    if config.pbs_hessian:
        return hessian_pbs(weight, A, B, keep, stats.hessian.to(weight.device), scale=scale, ridge=config.pbs_ridge)
    if config.preset == "paper":  # the authors' quirks: U without s, and the sqrt of the statistic
        act, scale = activation_statistic(stats, "paper"), 1.0
    else:
        act = stats.act_sq
    return partial_brain_surgeon(weight, A, B, keep, act, scale=scale, keep_weight=config.pbs_keep_weight,
                                 ridge=config.pbs_ridge, max_pruned_per_row=config.pbs_max_pruned_per_row)
