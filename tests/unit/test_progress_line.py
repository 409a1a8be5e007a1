"""The CLI's progress line: drawn in place on a terminal, throttled, ended with a newline; silent elsewhere."""
from __future__ import annotations

import io
import logging

from merge_core.commands import progress_line
from merge_core.commands.progress_line import ProgressLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_in_place_with_estimate_and_ends_the_line(monkeypatch):
    clock = iter([0.0, 1.0, 1.05, 2.0, 4.0])  # start, then one reading per call
    monkeypatch.setattr(progress_line.time, "perf_counter", lambda: next(clock))
    out = Terminal()
    with ProgressLine("merge (rsvd)", out) as line:
        line(1, 4, "a")   # t = 1: drawn
        line(2, 4, "b")   # t = 1.05: too soon, skipped
        line(3, 4, "c")   # t = 2: drawn
        line(4, 4, "d")   # t = 4: the last one is always drawn
    drawn = out.getvalue().split("\r")[1:]
    assert [d.rstrip() for d in drawn] == ["merge (rsvd) 1/4 (25 %), 1 s, about 3 s left",
                                          "merge (rsvd) 3/4 (75 %), 2 s, about 1 s left",
                                          "merge (rsvd) 4/4 (100 %), 4 s"]
    assert out.getvalue().endswith("\n")


def test_silent_in_pipes_and_logs_each_module_under_verbose(caplog):
    piped = io.StringIO()
    with ProgressLine("fuse", piped) as line:
        line(1, 1, "a")
    assert piped.getvalue() == ""
    caplog.set_level(logging.INFO)  # -v: every module is logged, and no line is drawn
    out = Terminal()
    with ProgressLine("fuse", out) as line:
        line(1, 2, "a")
        line(2, 2, "b")
    assert out.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["fuse 1/2 a", "fuse 2/2 b"]
