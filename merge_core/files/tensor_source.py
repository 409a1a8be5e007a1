"""Read tensors safely and lazily: `.safetensors` one tensor at a time (header validated first),
`.pt/.pth/.ckpt/.bin` only through torch.load(weights_only=True), folders of shards as one source.

Every failure is one clear line naming the file: missing, empty, truncated, corrupt header, a pickle
that would run code, a non-tensor payload.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import threading
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from ..errors import InputFileError
from .stream_writer import ST_DTYPE

PICKLE_OUTPUTS = (".pt", ".pth", ".ckpt")  # the pickles written (torch.save), by output name
PICKLE_SUFFIXES = PICKLE_OUTPUTS + (".bin",)  # the pickles read (weights_only)
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024
TORCH_DTYPE = {name: dtype for dtype, name in ST_DTYPE.items()}
TORCH_DTYPE.update({name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"),
                                                                  ("U64", "uint64")) if hasattr(torch, attr)})
NESTED_KEYS = ("state_dict", "model")  # checkpoints that wrap their tensors in one of these (Lightning, some trainers)


def check_file(path: Path) -> int:
    if not path.exists():
        raise InputFileError(f"file not found: {path}")
    if path.is_dir():
        raise InputFileError(f"expected a file, got a folder: {path}")
    size = path.stat().st_size
    if size == 0:
        raise InputFileError(f"file is empty: {path}")
    return size


def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """Validated header of a .safetensors file: (tensor entries, metadata) with clear errors."""
    header, metadata, _ = _read_header(path)
    return header, metadata


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, where the data starts: entries' data_offsets count from there)."""
    size = check_file(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InputFileError(f"truncated file (shorter than a safetensors header): {path}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise InputFileError(f"corrupt or truncated safetensors header (length {n}, file {size} bytes): {path}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputFileError(f"corrupt safetensors header ({exc.__class__.__name__}): {path}") from None
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            count = 1
            for d in entry["shape"]:
                count *= int(d)
            width = SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise InputFileError(f"corrupt safetensors header entry for '{key}' (dtype, shape or data offsets): "
                                 f"{path}") from None
        if not 0 <= start <= end:
            raise InputFileError(f"corrupt safetensors header: '{key}' has data offsets {start}..{end}: {path}")
        if end > data_len:
            raise InputFileError(f"truncated file: tensor '{key}' needs {end - data_len:,} bytes more than the "
                                 f"file holds ({size:,} bytes): {path}")
        if end - start != count * width:
            raise InputFileError(f"corrupt safetensors header: '{key}' size does not match its shape: {path}")
    spans = sorted((entry["data_offsets"], key) for key, entry in header.items())
    for ((_, end), key), ((start, _), other) in zip(spans, spans[1:]):
        if start < end:  # each tensor reads its own bytes only
            raise InputFileError(f"corrupt safetensors header: '{key}' and '{other}' overlap: {path}")
    return header, metadata, 8 + n


def _torch_load(path: Path):
    """weights_only load, memory-mapped when the file is torch's zip format."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def _why(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"Unsupported (?:global|operand)[^\n.]*", text)
    return found.group(0) if found else (text.strip().splitlines() or [exc.__class__.__name__])[0][:120]


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) only; a nested `state_dict` or `model` unwrapped; non-tensor entries refused."""
    check_file(path)
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as exc:
        raise InputFileError(f"refusing to load {path}: not a plain tensor checkpoint, it would need code to "
                             f"load ({_why(exc)})") from None
    except Exception as exc:  # noqa: BLE001 — anything else is a damaged file
        raise InputFileError(f"corrupt or truncated checkpoint {path}: {_why(exc)}") from None
    for wrapper in NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise InputFileError(f"non-tensor payload in {path}: a {type(obj).__name__}, expected a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [k for k, v in obj.items() if not isinstance(v, (torch.Tensor, int, float, str))]
    if not tensors or others:
        bad = others[0] if others else next(iter(obj), "<empty>")
        raise InputFileError(f"non-tensor payload in {path}: entry '{bad}' is not a tensor")
    return tensors


class TensorSource:
    """Lazy read access to the tensors of one file or a folder of shards.

    get(key) reads one tensor into memory of its own with a positioned read: a caller that streams a 6 GiB
    checkpoint and drops each tensor holds one tensor, where a memory map kept open would count every page
    it touched in the process's RSS.  items() memory-maps (safetensors' reader), for adapter files read whole.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._where: dict[str, tuple[Path, str, int, int]] = {}  # key -> (file, dtype, first byte, end byte)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._eager: Optional[dict[str, torch.Tensor]] = None
        self._files: dict[Path, BinaryIO] = {}  # opened by get(), kept open until close()
        self._lock = threading.Lock()  # opening files; and, without os.preadv (Windows), seek + read as one step
        self.metadata: dict[str, str] = {}
        if self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise InputFileError(f"folder holds no .safetensors files: {self.path}")
            for f in files:
                self._add_safetensors(f)
        elif self.path.suffix.lower() in PICKLE_SUFFIXES:
            self._eager = load_pickle(self.path)
            self._shapes = {k: tuple(v.shape) for k, v in self._eager.items()}
        else:
            self._add_safetensors(self.path)

    def _add_safetensors(self, path: Path) -> None:
        header, metadata, data_start = _read_header(path)
        self.metadata.update(metadata)
        for key, entry in header.items():
            start, end = entry["data_offsets"]
            self._where[key] = (path, entry["dtype"], data_start + start, data_start + end)
            self._shapes[key] = tuple(entry["shape"])

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read into a new tensor (thread-safe; each file is opened once, its header parsed once)."""
        if self._eager is not None:
            return self._eager[key]
        path, dtype, start, end = self._where[key]
        if dtype not in TORCH_DTYPE:
            raise InputFileError(f"cannot read tensor '{key}' from {path}: dtype {dtype} has no torch equivalent")
        tensor = torch.empty(self._shapes[key], dtype=TORCH_DTYPE[dtype])
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        try:
            got = self._read_at(path, start, view)
        except OSError as exc:
            raise InputFileError(f"cannot read tensor '{key}' from {path}: {exc.strerror or exc}") from None
        if got != end - start:
            raise InputFileError(f"truncated file: tensor '{key}' has {got} of its {end - start} bytes: {path}")
        return tensor

    def _read_at(self, path: Path, offset: int, view: memoryview) -> int:
        """Fill `view` from byte `offset` of `path`; the bytes read (fewer only at the end of the file)."""
        with self._lock:
            fh = self._files.get(path)
            if fh is None:
                fh = self._files[path] = open(path, "rb", buffering=0)
        got = 0
        while got < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(fh.fileno(), [view[got:]], offset + got)
            else:
                with self._lock:
                    fh.seek(offset + got)
                    n = fh.readinto(view[got:])
            if not n:
                break
            got += n
        return got

    def close(self) -> None:
        """Close the files get() opened (tensors already read stay valid); a later get() opens them again."""
        files, self._files = self._files, {}
        for fh in files.values():
            fh.close()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors, one file handle per shard (cheaper than get() per key)."""
        if self._eager is not None:
            yield from self._eager.items()
            return
        by_file: dict[Path, list[str]] = {}
        for key, (path, *_) in self._where.items():
            by_file.setdefault(path, []).append(key)
        for path, keys in by_file.items():
            try:
                fh = safe_open(str(path), framework="pt", device="cpu")
            except SafetensorError as exc:  # a header our own check passed but the library refuses
                raise InputFileError(f"corrupt safetensors file ({exc}): {path}") from None
            with fh:
                for key in keys:
                    yield key, fh.get_tensor(key)

    def __len__(self) -> int:
        return len(self._shapes)
