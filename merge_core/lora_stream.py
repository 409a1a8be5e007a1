"""Write a kohya-named LoRA .safetensors one module at a time, for outputs made piece by piece (extract,
merge): the file grows as modules are made, so writing overlaps the work and memory holds one module.

The header is reserved up front from a bound on what may be written (`lora_entries` per module, then
files.stream_writer.header_bound) and filled in by `finish`, with the kohya/modelspec metadata and recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch

from .adapters import AdapterModule
from .errors import MergeCoreError
from .files.metadata import lora_metadata
from .files.stream_writer import Entry, SafetensorsStream, header_bound
from .keys.suffixes import KOHYA
from .lora_file import module_state


ALPHA_BYTES = 4  # a module's alpha: an fp32 scalar (lora_entries)


def lora_entries(name: str, shape: tuple[int, ...], rank: int, dtype: torch.dtype) -> list[Entry]:
    """The tensors of a LoRA/LoCon of `rank` on a weight of `shape` (out, in[, kh, kw]): up, down, alpha."""
    return [(name + KOHYA.up, dtype, (shape[0], rank, *[1] * (len(shape) - 2))),
            (name + KOHYA.down, dtype, (rank, *shape[1:])),
            (name + KOHYA.alpha, torch.float32, ())]


def header_reserve(entries: list[Entry], arch: str, recipe: Optional[dict], title: Optional[str],
                   carried: Optional[dict[str, str]] = None) -> int:
    """Header bytes for a LoraStream that may write `entries`, with the metadata finish() will write: sized as
    for LyCORIS modules (whose keys are the longest) and with `recipe` as long as the final one."""
    return header_bound(entries, lora_metadata({"loha"}, [], [], arch, recipe, title, carried), slack=4096)


class LoraStream:
    """add(name, module) appends the module's tensors (kohya names, `dtype`; alpha fp32); finish(...) writes
    the header with the metadata of what was added."""

    def __init__(self, fh: BinaryIO, header_bytes: int, dtype: torch.dtype):
        self._stream = SafetensorsStream(fh, header_bytes)
        self._dtype = dtype
        self._kinds: set[str] = set()
        self._ranks: list[int] = []
        self._alphas: list[float] = []

    @property
    def tensor_count(self) -> int:
        return len(self._stream.names)

    def add(self, name: str, module: AdapterModule, tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Append the module; `tensors`: its module_state(name, module, dtype) when made already (e.g. on the
        worker thread that computed it, so the writing thread only writes)."""
        for key, tensor in (tensors if tensors is not None else module_state(name, module, self._dtype)).items():
            self._stream.add(key, tensor)
        self._kinds.add(module.kind)
        if module.kind != "full":
            self._ranks.append(module.rank)
        alpha = getattr(module, "alpha", None)
        if alpha is not None:
            self._alphas.append(alpha)

    def finish(self, arch: str, recipe: Optional[dict], title: Optional[str],
               carried: Optional[dict[str, str]] = None) -> None:
        self._stream.finish(lora_metadata(self._kinds, self._ranks, self._alphas, arch, recipe, title, carried))


# adds the modules to the stream; returns what the header says: (arch, recipe, carried metadata)
Fill = Callable[[LoraStream], tuple[str, Optional[dict], Optional[dict[str, str]]]]


def stream_writer(reserve: int, dtype: torch.dtype, title: Optional[str], fill: Fill) -> Callable[[Path], None]:
    """A writer for files.atomic_write: `fill` streams the modules into the temp file, then the header is
    written from what it returns (a recipe made after the run, once the inputs' digests are in); nothing
    added is an error."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            stream = LoraStream(fh, reserve, dtype)
            arch, recipe, carried = fill(stream)
            if stream.tensor_count == 0:
                raise MergeCoreError("nothing to write: the result has no modules")
            stream.finish(arch, recipe, title, carried)

    return write
