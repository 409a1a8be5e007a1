"""Where model weights come from: anything with keys(), shape(key) and get(key) (a WeightSource).

`TensorSource` (files: .safetensors, shard folders, weights_only .pt) satisfies it, and so does
`DictSource`, which wraps an in-memory state dict (the ComfyUI nodes pass clean model weights this way).
Reads are one tensor at a time, so callers that stream keep memory near one layer.
"""
from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path
from typing import Mapping, Optional, Protocol, Union, runtime_checkable

import torch

from ..errors import InputFileError, MergeCoreError
from ..files.digests import sha256_later
from ..files.metadata import DIGEST_PLACEHOLDER
from ..files.tensor_source import PICKLE_SUFFIXES, TensorSource

KINDS = ("auto", "safetensors", "pytorch")


@runtime_checkable
class WeightSource(Protocol):
    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str) -> torch.Tensor: ...


class DictSource:
    """A WeightSource over a mapping key -> tensor (or a zero-argument callable returning one, read lazily)."""

    def __init__(self, tensors: Mapping[str, object], shapes: Mapping[str, tuple[int, ...]] | None = None):
        self._tensors = tensors
        self._shapes = dict(shapes) if shapes is not None else None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._shapes is not None:
            return tuple(self._shapes[key])
        return tuple(self.get(key).shape)

    def get(self, key: str) -> torch.Tensor:
        value = self._tensors[key]
        return value() if callable(value) else value


def check_kind(path: Path, kind: str, option: str) -> None:
    """The original scripts' --*-type: `safetensors` wants a .safetensors file or a folder of them,
    `pytorch` a .pt/.pth/.ckpt/.bin file; `auto` goes by the file name."""
    if kind not in KINDS:
        raise MergeCoreError(f"{option} must be one of {', '.join(KINDS)}, got {kind!r}")
    is_pickle = path.suffix.lower() in PICKLE_SUFFIXES
    if kind == "pytorch" and not is_pickle:
        raise InputFileError(f"{option} pytorch expects a {'/'.join(PICKLE_SUFFIXES)} file: {path}")
    if kind == "safetensors" and is_pickle:
        raise InputFileError(f"{option} safetensors expects a .safetensors file or a folder of them: {path}")


def open_weights(source: Union[str, os.PathLike, WeightSource], kind: str = "auto",
                 option: str = "model") -> WeightSource:
    """A WeightSource for a path (lazy file reader) or the object itself."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        check_kind(path, kind, option)
        return TensorSource(path)
    if not isinstance(source, WeightSource):
        raise MergeCoreError(f"{option}: expected a path or an object with keys()/shape()/get(), "
                             f"got {type(source).__name__}")
    return source


def checkpoint_digest(source: Union[str, os.PathLike, WeightSource]) -> "Future[Optional[str]]":
    """A checkpoint file's sha256 for a recipe, hashed in the background from now on and remembered between runs
    (files.digests); None for weights in memory and folders of shards (tens of GB, hashed on every run)."""
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    return sha256_later(path if path is not None and path.is_file() else None)


def digest_placeholder(digest: "Future[Optional[str]]") -> Optional[str]:
    """What stands for `digest` in a recipe that sizes a header: a sha256's length, or None for no hash."""
    return None if digest.done() and digest.result() is None else DIGEST_PLACEHOLDER


def label_of(source: Union[str, os.PathLike, WeightSource], fallback: str) -> Union[str, Path]:
    """A path for recipes and reports: the file itself, or a placeholder name for in-memory weights."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    path = getattr(source, "path", None)
    return Path(path) if path is not None else fallback
