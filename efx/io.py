"""Atomic file and folder writes: a crash leaves the old content or the new, never half of one."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_free(path: str | os.PathLike, *, overwrite: bool = False,
                      remedy: str = "pass --overwrite (overwrite=True) to replace it") -> bool:
    """Refuse an output path that is a file, or a non-empty folder unless `overwrite` is set
    (the error ends with `remedy`). Returns whether `path` is a non-empty folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} is a file, not a folder")
    occupied = path.exists() and any(path.iterdir())
    if occupied and not overwrite:
        raise FileExistsError(f"output {path} exists and is not empty; {remedy}")
    return occupied


@contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    An existing non-empty `path` is an error unless `overwrite` is True.
    """
    path = Path(path)
    check_output_free(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
