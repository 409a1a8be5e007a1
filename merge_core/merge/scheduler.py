"""Running a merge's batches: in order (one thread), or on worker threads.

On the CPU with torch set to n > 1 threads, n worker threads each run whole batches with one torch thread:
independent modules side by side scale better than splitting every small op across threads (no OpenMP
barrier per op, which stalls badly when the cores are shared), and each batch stays deterministic.  On a GPU,
up to CUDA_WORKERS threads each queue their batches on a CUDA stream of their own: one module's many small
kernels and solver round trips leave the GPU idle, and the CPU-side work (DARE's draws, the R×R solves)
runs beside the other threads' kernels.  Every result comes back on the CPU, copied on the worker's stream.
Methods that hold dense modules (ties, dare, the dense solver) get no more workers than half the available
memory (the GPU's free memory on a GPU) holds at DENSE_COPIES modules each: a 64-core machine merging a
language model's 8192×28672 layers would otherwise hold 64 × 2 × 0.9 GiB.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TypeVar

import torch

from ..device import with_cpu_fallback

AHEAD = 2  # batches started per worker before their results are recorded
CUDA_WORKERS = 4  # threads (streams) side by side on one GPU
DENSE_COPIES = 2  # dense fp32 modules a worker of a dense method holds at its peak (measured: 1.6–1.7)
MEMORY_SHARE = 0.5  # of the available memory, for the workers' dense modules
B = TypeVar("B")
R = TypeVar("R")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_cap(module_bytes: int, available: Optional[int]) -> Optional[int]:
    """Workers that fit DENSE_COPIES dense modules of `module_bytes` each in MEMORY_SHARE of `available` (at
    least 1); None (no cap) when the available memory is unknown."""
    if available is None or module_bytes <= 0:
        return None
    return max(1, int(available * MEMORY_SHARE) // (DENSE_COPIES * module_bytes))


def worker_count(device: torch.device) -> int:
    """Worker threads before any memory cap: torch's thread count, at most CUDA_WORKERS on a GPU."""
    n = torch.get_num_threads()
    return n if device.type == "cpu" else min(n, CUDA_WORKERS)


def _start_worker(device: torch.device) -> None:
    """A worker thread's setup: one torch thread; on a GPU, a CUDA stream of its own."""
    torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_stream(torch.cuda.Stream(device))


def _run_one(run: Callable[[B, torch.device], R], batch: B, device: torch.device) -> R:
    return with_cpu_fallback(lambda d: run(batch, d), device)


def run_work(work: deque[B], run: Callable[[B, torch.device], R], record: Callable[[B, R], None],
             device: torch.device, max_workers: Optional[int] = None) -> None:
    """run(batch, device) for every batch, record(batch, result) in the calling thread as each finishes (it
    may raise to cancel: batches not started are dropped).  `work` is consumed: no batch is referenced here
    after it is recorded, and at most two batches per worker are started ahead of the recording, so results
    never pile up faster than the caller takes them (e.g. writes them).  Workers: torch's thread count, at
    most CUDA_WORKERS on a GPU and `max_workers` (see worker_cap); with one, in order in this thread.  A batch
    that runs out of CUDA memory is redone on the CPU.  torch's thread count is restored afterwards."""
    workers = worker_count(device)
    if max_workers is not None:
        workers = max(1, min(workers, max_workers))
    if workers <= 1 or len(work) <= 1:
        while work:
            batch = work.popleft()
            record(batch, _run_one(run, batch, device))
        return
    if device.type == "cuda":  # torch loads its CUDA solvers on their first call, which two threads must not race
        torch.linalg.qr(torch.ones(1, 1, device=device))
    with torch_threads(1):
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge", initializer=_start_worker,
                                  initargs=(device,))
        try:
            running: dict[Future, B] = {}
            while work or running:
                while work and len(running) < AHEAD * workers:
                    batch = work.popleft()
                    running[pool.submit(_run_one, run, batch, device)] = batch
                    del batch
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    record(running.pop(future), future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def run_in_order(work: deque[tuple[int, B]], run: Callable[[tuple[int, B], torch.device], R],
                 emit: Callable[[tuple[int, B], R], None], device: torch.device, max_workers: Optional[int] = None,
                 finished: Optional[Callable[[tuple[int, B], R], None]] = None) -> None:
    """run_work over batches numbered 0, 1, 2, … in `work`: finished(item, result) as each is done (progress),
    emit(item, result) in number order, each as soon as it and every batch before it are done (a writer)."""
    waiting: dict[int, tuple[tuple[int, B], R]] = {}
    next_index = 0

    def record(item: tuple[int, B], result: R) -> None:
        nonlocal next_index
        if finished is not None:
            finished(item, result)
        waiting[item[0]] = (item, result)
        while next_index in waiting:
            emit(*waiting.pop(next_index))
            next_index += 1

    run_work(work, run, record, device, max_workers)
