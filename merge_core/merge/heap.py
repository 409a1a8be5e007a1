"""Keep a long merge's resident memory near what it really holds.

A merge allocates thousands of short-lived tensors between the long-lived merged factors; glibc keeps the
freed holes in its heap, so the resident size can grow by a third more than the live data.  HeapTrimmer
asks glibc to hand whole free pages back (malloc_trim(0)) whenever the anonymous resident size has grown by
`step` since the last time (a few milliseconds per call).  A no-op where there is no glibc.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Optional

STATM = "/proc/self/statm"


def _malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux") or not os.path.exists(STATM):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


def resident_bytes() -> int:
    """Resident memory not backed by files (memory-mapped inputs do not count)."""
    with open(STATM) as fh:
        fields = fh.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    def __init__(self, step: int = 64 << 20):
        self._trim = _malloc_trim()
        self._step = step
        self._mark = resident_bytes() if self._trim is not None else 0

    def __call__(self) -> None:
        if self._trim is None or resident_bytes() - self._mark < self._step:
            return
        self._trim(0)
        self._mark = resident_bytes()
