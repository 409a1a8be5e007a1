"""How much memory the system can still hand out without swapping, on Linux, Windows and other POSIX systems,
or a GPU has free: what caps the workers of methods that hold dense modules (merge/scheduler.worker_cap)."""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import torch

MEMINFO = "/proc/meminfo"


class _MemoryStatusEx(ctypes.Structure):
    """Windows' MEMORYSTATUSEX, as GlobalMemoryStatusEx fills it."""

    _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32)] + [
        (name, ctypes.c_ulonglong) for name in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile", "ullAvailPageFile",
                                                "ullTotalVirtual", "ullAvailVirtual", "ullAvailExtendedVirtual")]


def _windows() -> Optional[int]:
    status = _MemoryStatusEx()
    status.dwLength = ctypes.sizeof(status)
    try:
        ok = ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None
    return int(status.ullAvailPhys) if ok else None


def _meminfo() -> Optional[int]:
    """Linux's MemAvailable (free memory plus the page cache it can drop)."""
    try:
        with open(MEMINFO, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf() -> Optional[int]:
    """Other POSIX systems: the free pages, else (macOS, which does not report them) all physical pages."""
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            n = os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
        if n > 0:
            return n
    return None


def available_memory() -> Optional[int]:
    """Bytes the system can still hand out without swapping; None where it cannot be known."""
    if sys.platform == "win32":
        return _windows()
    return _meminfo() or _sysconf()


def available_on(device: torch.device) -> Optional[int]:
    """Bytes free for work on `device`: the GPU's free memory for CUDA, else available_memory()."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()
