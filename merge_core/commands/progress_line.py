"""A one-line progress display for the CLI: `merge 412/986 (42 %), 12 s, about 17 s left`, redrawn in place on
stderr when stderr is a terminal (never in pipes, logs or CI); under -v each module is logged instead
(`merge (rsvd) 412/986 lora_unet_…`)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional, TextIO

REDRAW = 0.2  # seconds between redraws
log = logging.getLogger(__name__)


class ProgressLine:
    """Progress callback (done, total, name) that draws the line; use as a context manager so the line is
    ended (or left alone when nothing was drawn)."""

    def __init__(self, what: str, stream: Optional[TextIO] = None):
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = logging.getLogger().isEnabledFor(logging.INFO)
        self.enabled = self.stream.isatty() and not self.verbose
        self.start = time.perf_counter()
        self.last = 0.0
        self.width = 0

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.verbose:
            log.info("%s %d/%d %s", self.what, done, total, name)
        now = time.perf_counter()
        if not self.enabled or (now - self.last < REDRAW and done < total):
            return
        self.last = now
        elapsed = now - self.start
        left = f", about {elapsed * (total - done) / done:.0f} s left" if 0 < done < total else ""
        text = f"{self.what} {done}/{total} ({100 * done // max(total, 1)} %), {elapsed:.0f} s{left}"
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, *exc) -> None:
        if self.width:
            self.stream.write("\n")
            self.stream.flush()
