"""Where the blended ForeSight scores wait between pruning calls (method.md section 3, score
memory): one bf16 value per weight, either in RAM or, by default, in files of a private
temporary folder, so that they cost no memory while training runs between calls. A call reads
one target's previous scores at a time and stages its new ones; they replace the old ones only
when the whole call succeeds.

Cost of the file store: two bytes per pruned weight written and read once per call (about
0.2 GB each way for SmolLM2-135M's targets); the RAM store holds those bytes for the whole run.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch


class ScoreStore:
    """Mapping of target name -> bf16 score tensor (on the CPU), in RAM or in files."""

    def __init__(self, offload: bool = True, folder: str | Path | None = None):
        self.offload = offload
        self._ram: dict[str, torch.Tensor] = {}
        self._staged: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._files: dict[str, Path] = {}
        self._staged_files: dict[str, Path] = {}
        self._root = Path(tempfile.mkdtemp(prefix="efx-scores-", dir=folder)) if offload else None
        self._generation = 0

    def __len__(self) -> int:
        return len(self._files if self.offload else self._ram)

    def __contains__(self, name: str) -> bool:
        return name in (self._files if self.offload else self._ram)

    def get(self, name: str) -> torch.Tensor | None:
        """The committed scores of `name` (bf16, CPU), or None."""
        if not self.offload:
            return self._ram.get(name)
        path = self._files.get(name)
        if path is None:
            return None
        raw = np.fromfile(path, dtype=np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(self._shapes[name])

    def stage(self, name: str, score: torch.Tensor) -> None:
        """Keep the new scores of `name` aside until `commit`."""
        score = score.detach().to("cpu", torch.bfloat16).contiguous()
        if not self.offload:
            self._staged[name] = score
            return
        folder = self._root / f"call{self._generation + 1}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{len(self._staged_files)}.bin"
        score.view(torch.int16).numpy().tofile(path)
        self._staged_files[name] = path
        self._shapes[name] = tuple(score.shape)

    def commit(self) -> None:
        """The staged scores replace the committed ones (targets not staged keep theirs)."""
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
        for path in self._staged_files.values():
            path.unlink(missing_ok=True)
        self._staged_files = {}

    def clear(self) -> None:
        """Forget every score (a call without score memory)."""
        self.discard()
        self._ram = {}
        self._files = {}
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        live = {p.parent for p in self._files.values()}
        for folder in self._root.iterdir() if self._root else ():
            if folder not in live:
                shutil.rmtree(folder, ignore_errors=True)

    def __del__(self):
        if getattr(self, "_root", None) is not None:
            shutil.rmtree(self._root, ignore_errors=True)
