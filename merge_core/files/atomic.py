"""Writes that lose nothing: temp file in the target folder then an atomic rename; never overwrite
unless asked; relative output names that stay inside their folder."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Union

from ..errors import OutputExistsError, UnsafePathError

PathLike = Union[str, os.PathLike]


def inside(root: PathLike, relative: PathLike) -> Path:
    """root/relative, refused if it resolves outside root (`..`, absolute paths, symlinks out)."""
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"path '{relative}' leaves the folder {base}")
    return target


def atomic_write(path: PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call write(tmp) on a temp file beside `path`, then move it into place.

    Without overwrite the final step is a hard link, which fails if `path` appeared meanwhile; any
    failure (including KeyboardInterrupt) removes the temp file and leaves `path` untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output exists, not overwriting (pass --overwrite to replace it): {path}")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"output appeared while writing, not overwriting: {path}") from None
            except OSError:  # filesystem without hard links
                if path.exists():
                    raise OutputExistsError(f"output exists, not overwriting: {path}") from None
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
