"""Device choice for all compute: `auto` = CUDA when present, fp32 always, CPU fallback on CUDA OOM."""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

COMPUTE_DTYPE = torch.float32


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto`/None -> cuda if available else cpu; `cuda` without a GPU is a clear error."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import MergeCoreError

        raise MergeCoreError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    return dev


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def with_cpu_fallback(fn: Callable[[torch.device], T], device: torch.device) -> T:
    """Run fn(device); if CUDA runs out of memory, free the cache and rerun fn on the CPU."""
    try:
        return fn(device)
    except RuntimeError as exc:
        if device.type != "cuda" or not is_oom(exc):
            raise
        log.warning("CUDA out of memory; retrying this module on the CPU")
        torch.cuda.empty_cache()
        return fn(torch.device("cpu"))
