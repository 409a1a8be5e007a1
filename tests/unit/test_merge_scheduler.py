"""Worker threads for a merge: at most the cap, and dense methods capped by the memory their modules need."""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch

from merge_core import memory
from merge_core.merge import engine, plan_merge
from merge_core.merge.scheduler import run_work, torch_threads, worker_cap
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import NAMES, lora_set, random_lora, shape_of

N = NAMES[0]  # 640x640
MODULE = 4 * 640 * 640  # its dense fp32 bytes


def test_worker_cap_fits_two_dense_modules_per_worker_in_half_the_memory():
    assert worker_cap(100 << 20, 1000 << 20) == 2  # 500 MiB / (2 × 100 MiB)
    assert worker_cap(100 << 20, 10 << 20) == 1  # always at least one
    assert worker_cap(100 << 20, None) is None  # unknown: no cap


def test_available_memory_comes_from_the_system(monkeypatch, tmp_path):
    """Linux's MemAvailable; without /proc the POSIX page counts; Windows' GlobalMemoryStatusEx (not here)."""
    if Path(memory.MEMINFO).exists():
        meminfo = memory.available_memory()
        assert meminfo > 0
        monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "no_such_file"))
        assert 0 < memory.available_memory() <= 2 * meminfo  # the free pages, without the page cache
    assert memory._windows() is None or sys.platform == "win32"


def run_threads(max_workers):
    """(threads that ran batches, results in the order they were recorded) for 12 batches on 4 torch threads."""
    seen, recorded = set(), []

    def run(batch, device):
        seen.add(threading.get_ident())
        time.sleep(0.005)
        return batch

    with torch_threads(4):
        run_work(deque(range(12)), run, lambda batch, result: recorded.append(result), torch.device("cpu"),
                 max_workers)
    return seen, recorded


def test_run_work_uses_no_more_threads_than_the_cap():
    seen, recorded = run_threads(2)
    assert 1 <= len(seen) <= 2 and threading.get_ident() not in seen and sorted(recorded) == list(range(12))
    seen, recorded = run_threads(1)  # one worker: in order, on the calling thread
    assert seen == {threading.get_ident()} and recorded == list(range(12))


def test_dense_methods_are_capped_by_the_memory_their_modules_need(monkeypatch):
    sets = [lora_set({N: random_lora(shape_of(N), 8, 4.0, seed=i)}) for i in range(2)]
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "available_on", lambda device: 10 * MODULE)  # half of it holds 5 modules
    with torch_threads(8):
        assert engine.dense_worker_cap(plan_merge(sets, "ties"), cpu) == 2
        assert engine.dense_worker_cap(plan_merge(sets, "svd", solver="dense"), cpu) == 2
        assert engine.dense_worker_cap(plan_merge(sets, "rsvd"), cpu) is None  # factored: nothing dense held
