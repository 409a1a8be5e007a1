"""Write a .safetensors file one tensor at a time, so memory stays at one tensor however big the file.

`safetensors.save_file` needs every tensor in memory.  Here the tensor bytes are appended as they come,
after a header area reserved up front; `finish()` writes the header (JSON padded with spaces, which the
format allows) into that area.  The caller bounds the header size from what it may write
(`header_bound`), so the file never has to be rewritten.

Every WRITEBACK bytes the new data is handed to the disk (posix_fadvise DONTNEED starts the writeback of
dirty pages; it drops only pages already on disk), so the disk writes while the caller computes the next
tensors, instead of the whole file being flushed at the end (a rename over an existing file waits for that
on ext4).  The hint is advisory: where it is missing or refused, nothing changes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import BinaryIO, Callable, Iterable, Optional, Union

import torch

from ..errors import MergeCoreError

ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
Entry = tuple[str, torch.dtype, tuple[int, ...]]  # a tensor a file will hold: name, dtype, shape
ALIGN = 8
WRITEBACK = 8 << 20
NUMPY_NATIVE = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                torch.uint8, torch.bool}  # written straight from .numpy(); others as raw bytes


def _entry_json(name: str, dtype: str, shape: Iterable[int], start: int, end: int) -> str:
    return json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}},
                      separators=(",", ":"))[1:-1]


def header_bound(entries: Iterable[Entry], metadata: Optional[dict] = None,
                 slack: int = 1024) -> int:
    """Bytes enough for a header naming any subset of `entries` (name, dtype, shape) plus `metadata`."""
    entries = list(entries)
    total = sum(math.prod(shape) * dt.itemsize for _, dt, shape in entries)
    size = sum(len(_entry_json(n, ST_DTYPE[dt], s, total, total)) + 1 for n, dt, s in entries)
    if metadata:
        size += len(json.dumps({"__metadata__": metadata}, separators=(",", ":"))) + 1
    return size + slack


def data_offset(header_bytes: int) -> int:
    """Where the tensor data starts in a file whose header reserve is `header_bytes`: the 8-byte length, then
    the header rounded up to ALIGN."""
    return 8 + -(-max(int(header_bytes), 2) // ALIGN) * ALIGN


class SafetensorsStream:
    """Append tensors to an open binary file; `finish(metadata)` writes the header into the reserved area."""

    def __init__(self, fh: BinaryIO, header_bytes: int):
        self._fh = fh
        self._reserve = data_offset(header_bytes) - 8
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._handed = 0  # data bytes whose writeback was started
        fh.seek(8 + self._reserve)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"tensor '{name}' written twice")
        t = tensor.detach()
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.to("cpu").contiguous()
        if t.dtype not in ST_DTYPE:
            raise MergeCoreError(f"cannot write tensor '{name}' of dtype {t.dtype} to safetensors")
        data = t.numpy() if t.dtype in NUMPY_NATIVE else t.reshape(-1).view(torch.uint8).numpy()
        self._fh.write(data)
        end = self._offset + data.nbytes
        self._entries[name] = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, end]}
        self._offset = end
        if self._offset - self._handed >= WRITEBACK:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Start the disk write of the bytes added since the last call (POSIX systems; a no-op elsewhere)."""
        if hasattr(os, "posix_fadvise"):
            self._fh.flush()
            try:
                os.posix_fadvise(self._fh.fileno(), 8 + self._reserve + self._handed,
                                 self._offset - self._handed, os.POSIX_FADV_DONTNEED)
            except OSError:  # e.g. a file system that does not take the hint
                pass
        self._handed = self._offset

    def finish(self, metadata: Optional[dict[str, str]] = None) -> None:
        header = dict(self._entries)
        if metadata:
            header = {"__metadata__": {k: str(v) for k, v in metadata.items()}, **header}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(raw) > self._reserve:
            raise MergeCoreError(f"internal error: safetensors header needs {len(raw)} bytes, "
                                 f"only {self._reserve} were reserved")
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", self._reserve))
        self._fh.write(raw + b" " * (self._reserve - len(raw)))
        self._fh.seek(0, 2)


def write_safetensors(path: os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], header_bytes: int,
                      metadata: Union[None, dict[str, str], Callable[[], dict[str, str]]] = None) -> None:
    """A new .safetensors file at `path` from (name, tensor) pairs, each written as it comes (the pairs may be
    made one at a time, so memory holds one of them), the header in `header_bytes` reserved up front and
    written last: `metadata` may be a function, called then (e.g. for hashes computed meanwhile)."""
    with open(path, "wb") as fh:
        stream = SafetensorsStream(fh, header_bytes)
        for name, tensor in tensors:
            stream.add(name, tensor)
        stream.finish(metadata() if callable(metadata) else metadata)
