"""What a pruning schedule carries from one call to the next (`PruneMemory`), and where it waits
between calls: the blended ForeSight scores of the score memory (method.md section 3; one bf16
value per weight) and the previous call's bit-packed keep-masks (one bit per weight). Either in RAM or, by
default, in files of a private temporary folder, so that they cost no memory while training
runs between calls. A call reads one target's previous entry at a time and stages its new one;
the staged entries replace the old ones only when the whole call succeeds.

Cost of the files: the bytes are written and read once per call (for SmolLM2-135M's targets
about 0.2 GB of scores and 13 MB of masks each way); in RAM they would be held for the whole run.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch


class _File(NamedTuple):
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class CarriedTensors:
    """Mapping of target name -> CPU tensor (of the dtype it was staged in), in RAM or in files."""

    def __init__(self, offload: bool = True, folder: str | Path | None = None):
        self.offload = offload
        self._ram: dict[str, torch.Tensor] = {}
        self._staged: dict[str, torch.Tensor] = {}
        self._files: dict[str, _File] = {}
        self._staged_files: dict[str, _File] = {}
        self._root = Path(tempfile.mkdtemp(prefix="efx-calls-", dir=folder)) if offload else None
        self._generation = 0

    @property
    def folder(self) -> Path | None:
        """The private folder of the files (None in RAM)."""
        return self._root

    @property
    def nbytes(self) -> int:
        """Bytes of the committed entries (in files or in RAM)."""
        if not self.offload:
            return sum(t.numel() * t.element_size() for t in self._ram.values())
        return sum(e.path.stat().st_size for e in self._files.values())

    def close(self) -> None:
        """Forget every entry and remove the folder."""
        self.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._files if self.offload else self._ram)

    def __contains__(self, name: str) -> bool:
        return name in (self._files if self.offload else self._ram)

    def get(self, name: str) -> torch.Tensor | None:
        """The committed tensor of `name` (CPU), or None."""
        if not self.offload:
            return self._ram.get(name)
        entry = self._files.get(name)
        if entry is None:
            return None
        raw = torch.from_numpy(np.fromfile(entry.path, dtype=np.uint8))
        return raw.view(entry.dtype).reshape(entry.shape)

    def stage(self, name: str, value: torch.Tensor) -> None:
        """Keep the new tensor of `name` aside until `commit`."""
        value = value.detach().to("cpu").contiguous()
        if not self.offload:
            self._staged[name] = value
            return
        folder = self._root / f"call{self._generation + 1}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{len(self._staged_files)}.bin"
        value.reshape(-1).view(torch.uint8).numpy().tofile(path)
        self._staged_files[name] = _File(path, tuple(value.shape), value.dtype)

    def commit(self) -> None:
        """The staged entries replace the committed ones (targets not staged keep theirs)."""
        if not self.offload:
            self._ram.update(self._staged)
            self._staged = {}
            return
        self._files.update(self._staged_files)
        self._staged_files = {}
        self._generation += 1
        self._remove_unreferenced()

    def discard(self) -> None:
        """Drop what was staged (a failed call)."""
        self._staged = {}
        for entry in self._staged_files.values():
            entry.path.unlink(missing_ok=True)
        self._staged_files = {}

    def clear(self) -> None:
        """Forget every entry (a call without score memory)."""
        self.discard()
        self._ram = {}
        self._files = {}
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        live = {entry.path.parent for entry in self._files.values()}
        for folder in self._root.iterdir() if self._root else ():
            if folder not in live:
                shutil.rmtree(folder, ignore_errors=True)

    def __del__(self):
        if getattr(self, "_root", None) is not None:
            shutil.rmtree(self._root, ignore_errors=True)


@dataclass
class PruneMemory:
    """What a schedule carries from one call to the next, by target name: blended scores (bf16,
    two bytes per weight) and the previous keep-masks (uint8, bit-packed by `pack_mask`: one bit
    per weight), both in temporary files by default."""

    scores: CarriedTensors = field(default_factory=CarriedTensors)
    masks: CarriedTensors = field(default_factory=CarriedTensors)
    calls: int = 0


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool keep-mask as `PruneMemory` keeps it: a uint8 CPU tensor, one bit per weight, row-major."""
    return torch.from_numpy(np.packbits(keep.reshape(-1).cpu().numpy()))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The bool keep-mask (CPU) of `shape` that `pack_mask` packed."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape)).astype(bool)).reshape(shape)


def mask_overlap(previous: torch.Tensor | None, packed: torch.Tensor, numel: int) -> float | None:
    """Jaccard overlap of the pruned sets of two calls, counted on their packed masks: a pruned
    weight is a 0 bit, and the bits `pack_mask` pads the last byte with (0 in both) are taken off."""
    if previous is None:
        return None
    pad = 8 * packed.numel() - numel
    previous, packed = previous.numpy(), packed.numpy()
    both = int(np.bitwise_count(~(previous | packed)).sum(dtype=np.int64)) - pad
    either = int(np.bitwise_count(~(previous & packed)).sum(dtype=np.int64)) - pad
    return both / either if either else 1.0
