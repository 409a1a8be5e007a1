"""Writes that lose nothing: temp file in the target folder then an atomic rename; never overwrite
unless asked; relative output names that stay inside their folder; a full disk, a read-only folder or a
file in use is one clear line, with the temp file gone and the old output as it was."""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

from ..errors import OutputExistsError, OutputWriteError, UnsafePathError

PathLike = Union[str, os.PathLike]


def _errnos(*names: str) -> frozenset:
    return frozenset(getattr(errno, name) for name in names if hasattr(errno, name))


# what write() itself raises, with no file name attached (the only errors taken as the output's when unnamed)
UNNAMED_WRITE_ERRNOS = _errnos("ENOSPC", "EDQUOT", "EFBIG")
WRITE_ERRNOS = UNNAMED_WRITE_ERRNOS | _errnos("EROFS", "EACCES", "EPERM", "ENOENT", "EISDIR")
NOT_A_FOLDER_ERRNOS = _errnos("EEXIST", "ENOTDIR")  # making the output's folder, where a file stands on the way
# Windows cannot replace a file that is open (our inputs are memory-mapped while the output is written)
OPEN_FILES_LOCKED = os.name == "nt"


def inside(root: PathLike, relative: PathLike) -> Path:
    """root/relative, refused if it resolves outside root (`..`, absolute paths, symlinks out)."""
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"path '{relative}' leaves the folder {base}")
    return target


def refuse_existing(path: PathLike, overwrite: bool, inputs: Iterable[object] = ()) -> None:
    """OutputExistsError when `path` exists and overwriting it was not asked for; on Windows, an
    OutputWriteError when it is one of the `inputs` (paths; other sources skipped): replacing it would fail
    only once all the work is done."""
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"output exists, not overwriting (pass --overwrite to replace it): {path}")
    if OPEN_FILES_LOCKED and any(isinstance(p, (str, os.PathLike)) and Path(p).is_file() and os.path.samefile(p, path)
                                 for p in inputs):
        raise OutputWriteError(f"cannot write {path}: it is an input, which stays open while the output is written, "
                               "and Windows cannot replace an open file; write to a new name.")


def _temp_beside(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{suffix}")


@contextmanager
def write_errors(path: Path, *own: Path) -> Iterator[None]:
    """OSErrors of writing `path` — on it, on the temp paths `own` or what is in them, or on a folder above
    it — as one-line OutputWriteErrors (disk full, read-only, no permission, in use, no such folder, a file
    where a folder should be); others as they are."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            ours = exc.errno in UNNAMED_WRITE_ERRNOS
        else:
            culprit = Path(os.fspath(exc.filename))
            ours = culprit in path.parents or any(culprit == p or p in culprit.parents for p in (path, *own))
        not_a_folder = exc.errno in NOT_A_FOLDER_ERRNOS and exc.filename is not None and culprit in path.parents
        if not ours or not (exc.errno in WRITE_ERRNOS or not_a_folder):
            raise
        if not_a_folder:
            why = "a folder on its path is a file"
        elif os.name == "nt" and exc.filename2 is not None and exc.errno == errno.EACCES:
            why = ("it is in use (Windows cannot replace an open file, such as the checkpoint a bake reads); "
                   "write to a new name")
        else:
            why = exc.strerror or str(exc)
        raise OutputWriteError(f"cannot write {path}: {why}.") from None


@contextmanager
def _staged(path: Path, overwrite: bool, *own: Path) -> Iterator[Path]:
    """A temp path beside `path` for the caller to write and move into place; refused up front if `path`
    exists without overwrite, removed afterwards (file or folder) whatever happens, write errors as one line."""
    refuse_existing(path, overwrite)
    tmp = _temp_beside(path, "tmp")
    with write_errors(path, tmp, *own):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()


def atomic_write(path: PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call write(tmp) on a temp file beside `path`, then move it into place.

    Without overwrite the final step is a hard link, which fails if `path` appeared meanwhile; any
    failure (including KeyboardInterrupt) removes the temp file and leaves `path` untouched.
    """
    path = Path(path)
    with _staged(path, overwrite) as tmp:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"output appeared while writing, not overwriting: {path}") from None
            except OSError:  # filesystem without hard links
                refuse_existing(path, False)
                os.replace(tmp, path)
    return path


def atomic_folder(path: PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call write(tmp) on a temp folder beside `path`, then move it into place; an old folder is moved aside
    first and put back if the move fails, and removed only once the new one is in place."""
    path = Path(path)
    old = _temp_beside(path, "old")
    with _staged(path, overwrite, old) as tmp:
        tmp.mkdir()
        write(tmp)
        replacing = path.exists()
        if replacing:
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if replacing:
                os.rename(old, path)
            raise
        if replacing:
            shutil.rmtree(old, ignore_errors=True)
    return path
