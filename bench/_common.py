"""Small helpers shared by the bench/*.py scripts: timing, peak memory, test operators, tables.

Stable API (other benchmarks import these):
    sync() -> None                                    wait for queued CUDA work (no-op without CUDA)
    timeit(fn, repeats=3, warmup=1) -> float          median wall seconds of fn()
    child_peak_mb(code, path) -> float                 peak resident memory (MiB) of a fresh interpreter running code
    decaying_factors(out, inn, r, decay=0.8, seed=0, dtype=torch.float32) -> (U, V)
    md_table(headers, rows) -> str                     GitHub-flavoured markdown table
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import torch


def sync() -> None:
    """Wait for queued CUDA work so wall time covers it (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of `repeats` calls of fn() after `warmup` untimed calls (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child_peak_mb(code: str, path: str) -> float:
    """Run Python `code` in a fresh interpreter (with `path` on sys.path) and return that process's own peak
    resident memory in MiB: VmHWM, read by the child at its end.  (ru_maxrss of a child is no good on Linux:
    it carries the parent's high-water mark across fork+exec.)  Raises RuntimeError if the child fails."""
    probe = ("\nwith open('/proc/self/status') as _f:\n"
             "    _hwm = [line.split()[1] for line in _f if line.startswith('VmHWM')][0]\n"
             "print('VmHWM', _hwm, file=sys.stderr)")
    script = f"import sys; sys.path.insert(0, {path!r})\n{code}{probe}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    kib = next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("VmHWM"))
    return int(kib) / 1024.0


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
