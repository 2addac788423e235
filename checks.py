"""Input checks every dtq config and command shares (torch-free: engines/ and runtime/ use them).

- :func:`check_finite_fields`: a config dataclass's float options must be finite numbers
  (``--cfg-scale nan`` sampled black images and wrote invalid JSON); each config's
  ``__post_init__`` calls it, so the CLI and the Python API refuse alike.
- :func:`check_output_path`: an output path that cannot be written is refused before any work
  starts (a sampling run must not fail after an hour because ``--out`` is a regular file).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Literal


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_finite_fields(cfg: object) -> None:
    """Raise ValueError naming the first float field (or float in a list field) that is NaN or infinite."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{_flag(f.name)} must be a finite number, got {v}")


def check_output_path(path: str | os.PathLike, kind: Literal["dir", "file"], marker: str | None = None) -> Path:
    """Refuse an output ``path`` that cannot be written as a ``kind`` ("dir" or "file"): a directory
    output that is an existing file (or the reverse), a parent that is a file, or a nearest existing
    ancestor without write permission. ``marker``: the output replaces the whole directory, so an
    existing non-empty one must hold this file (be an earlier output of the same kind). Creates
    nothing. Returns ``Path(path)``."""
    path = Path(path)
    what = "output directory" if kind == "dir" else "output file"
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise ValueError(f"{what} {path} exists and is not a directory")
        if kind == "file" and path.is_dir():
            raise ValueError(f"{what} {path} is an existing directory")
        if marker is not None and path.is_dir() and not (path / marker).exists() and any(path.iterdir()):
            raise ValueError(f"{what} {path} exists and is not a directory this command writes (no {marker}); "
                             "refusing to replace it")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot create {what} {path}: {ancestor} is a file, not a directory")
    # the file/directory itself is replaced through a sibling, so its parent must be writable
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {path}: no write permission in {ancestor}")
    return path
