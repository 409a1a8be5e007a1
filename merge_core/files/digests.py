"""The inputs' sha256 for recipes: hashed on a background thread beside the work, and remembered between runs.

Hashing costs one core ~0.7 s per GB (0.16 s of each 228 MB SDXL LoRA here), again on every merge of the same
files, so a file's hash is remembered and reused while its size, mtime, ctime, inode and device are all as they
were when it was hashed.  A file changed less than SETTLE_SECONDS before it was hashed is not remembered: a
second change within the same clock tick would leave its times as they were (git's "racy" index entries).
On Windows st_ctime is the creation time, so there a rewrite in place is told by its size and mtime alone.

Where: the folder $MERGE_CORE_CACHE ("off" keeps nothing), else $XDG_CACHE_HOME/lora-rsvd-merge, else
~/.cache/lora-rsvd-merge (%LOCALAPPDATA%\\lora-rsvd-merge on Windows): one JSON file naming at most MAX_ENTRIES
files, replaced atomically.  A cache that cannot be read or written is passed over (the hash is computed).
Folders (PEFT adapters) are hashed every time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

from .atomic import atomic_write

ENV = "MERGE_CORE_CACHE"
FILE_NAME = "sha256.json"
MAX_ENTRIES = 2000  # the most recently hashed files are kept
SETTLE_SECONDS = 2.0
_HEX64 = re.compile(r"[0-9a-f]{64}")
_cache_lock = threading.Lock()
log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a folder's files in name order (read into one reused, cache-sized buffer:
    no allocation per block, and no mapping that would count the file twice in the process's RSS)."""
    p = Path(path)
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


def cache_file() -> Optional[Path]:
    """The cache's JSON file, or None when caching is off ($MERGE_CORE_CACHE=off) or there is no home."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen.lower() in ("off", "0", "none"):
        return None
    if chosen:
        return Path(chosen) / FILE_NAME
    base = os.environ.get("LOCALAPPDATA" if os.name == "nt" else "XDG_CACHE_HOME")
    try:
        folder = Path(base) if base else Path.home() / ".cache"
    except RuntimeError:  # no home directory to be found
        return None
    return folder / "lora-rsvd-merge" / FILE_NAME


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read(store: Path) -> dict[str, dict]:
    """The cache's entries {file: {"stat": signature, "sha256": hex}}; {} when missing or unreadable."""
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("stat"), list)
            and isinstance(v.get("sha256"), str) and _HEX64.fullmatch(v["sha256"])}


def _remember(store: Path, key: str, entry: dict) -> None:
    """Add `entry` under `key` as the newest, dropping the oldest beyond MAX_ENTRIES; the file is read again
    first, so entries other processes wrote meanwhile are kept."""
    entries = _read(store)
    entries.pop(key, None)
    entries[key] = entry
    text = json.dumps(dict(list(entries.items())[-MAX_ENTRIES:]), separators=(",", ":"))
    try:
        atomic_write(store, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    except Exception as exc:  # noqa: BLE001 — a cache that cannot be written costs only the next hash
        log.debug("sha256 cache not written (%s): %s", store, exc)


def input_sha256(path: PathLike) -> str:
    """sha256_of(path), or the hash remembered for this file while it is unchanged (see the module docstring)."""
    p = Path(path).resolve()
    store = cache_file()
    if store is None or not p.is_file():
        return sha256_of(p)
    key, before = str(p), _signature(p.stat())
    with _cache_lock:
        entry = _read(store).get(key)
    if entry is not None and entry["stat"] == before:
        return entry["sha256"]
    started = time.time_ns()
    digest = sha256_of(p)
    st = p.stat()
    if _signature(st) == before and started - max(st.st_mtime_ns, st.st_ctime_ns) >= SETTLE_SECONDS * 1e9:
        with _cache_lock:
            _remember(store, key, {"stat": before, "sha256": digest})
    return digest


_hasher: Optional[ThreadPoolExecutor] = None
_hasher_lock = threading.Lock()


def sha256_later(path: Optional[PathLike]) -> "Future[Optional[str]]":
    """input_sha256(path) on the one background hashing thread (None when there is no such file): start it as a
    file is opened and read it when the recipe is written, so hashing runs beside the work instead of after
    it (hashlib and file reads release the GIL; one thread leaves the other cores to the arithmetic)."""
    global _hasher
    if path is None or not Path(path).exists():
        done: Future = Future()
        done.set_result(None)
        return done
    with _hasher_lock:
        if _hasher is None:
            _hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    return _hasher.submit(input_sha256, path)
