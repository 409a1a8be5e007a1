"""Small helpers shared by the bench/*.py scripts: timing, peak memory, test operators, tables.

Stable API (other benchmarks import these):
    timeit(fn, repeats=3, warmup=1) -> float          median wall seconds of fn()
    peak_rss_mb_of(cmd) -> float                       peak resident memory (MiB) of a child process
    decaying_factors(out, inn, r, decay=0.8, seed=0, dtype=torch.float32) -> (U, V)
    md_table(headers, rows) -> str                     GitHub-flavoured markdown table
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import torch


def _sync() -> None:
    """Wait for queued CUDA work so wall time covers it (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of `repeats` calls of fn() after `warmup` untimed calls (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb_of(cmd: list[str]) -> float:
    """Run cmd as a child process and return its peak resident set size in MiB (Linux ru_maxrss is KiB).

    Uses os.wait4 on that one child, so other children of this process do not pollute the figure.
    Raises subprocess.CalledProcessError if the command fails.
    """
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_maxrss / 1024.0


def decaying_factors(out: int, inn: int, r: int, decay: float = 0.8, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors U [out, r], V [r, inn] with U @ V having singular values exactly decay**i, i = 0..r-1.

    U = Q_U diag(decay**i), V = Q_Vᵀ with random orthonormal Q_U, Q_V (seeded), so the spectrum is known
    without forming the dense product. Needs r <= min(out, inn).
    """
    if r > min(out, inn):
        raise ValueError(f"rank {r} exceeds min(out, inn) = {min(out, inn)}")
    gen = torch.Generator().manual_seed(seed)
    q_u, _ = torch.linalg.qr(torch.randn(out, r, generator=gen, dtype=torch.float64))
    q_v, _ = torch.linalg.qr(torch.randn(inn, r, generator=gen, dtype=torch.float64))
    sigma = decay ** torch.arange(r, dtype=torch.float64)
    return (q_u * sigma).to(dtype), q_v.T.contiguous().to(dtype)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render headers + rows as a markdown table; cells are str()-ed, columns padded for plain-text reading."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
