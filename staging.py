"""Write a directory output whole or not at all (torch-free: engines/, runtime/ and tools/ share it).

:func:`staged_directory` yields a fresh temporary sibling of the target; the caller writes every
file there; on success the sibling takes the target's place by rename, on any failure (KeyboardInterrupt
included) it is removed and the target is as it was. A reader never sees a half-written output or
one file of the old output beside one of the new.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Literal

from .checks import check_output_path


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, *, mode: Literal["replace", "merge"] = "replace",
                     marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that becomes ``target`` when the block ends.

    mode "replace": the whole directory is swapped (an existing one is moved aside first and removed
    after the rename), for outputs whose files belong together (recipes, engines).
    mode "merge": the new top-level entries replace same-named ones in an existing ``target`` and
    other files there are kept (a samples or report folder the user may keep other things in);
    a ``target`` that does not exist is created by one rename.
    ``marker``: with "replace", a non-empty existing ``target`` without this file is refused
    (never delete a directory that is not an earlier output of the same kind)."""
    target = check_output_path(target, "dir", marker=marker if mode == "replace" else None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if mode == "merge" and target.is_dir():
            for entry in tmp.iterdir():
                dest = target / entry.name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                elif entry.is_dir() and (dest.exists() or dest.is_symlink()):
                    dest.unlink()
                os.replace(entry, dest)
        else:
            if target.exists():
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                if old.exists() and not target.exists():
                    os.replace(old, target)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
