"""Device choice for all compute: `auto` = CUDA when present, fp32 always, CPU fallback on CUDA OOM.

Only CUDA (ROCm builds of torch included) and the CPU: Apple's MPS, DirectML and most XPUs lack the fp64
arithmetic and linear-algebra kernels (eigh, Cholesky, QR, SVD) the exact methods use."""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

from .errors import MergeCoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

COMPUTE_DTYPE = torch.float32
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto`/None -> cuda if available else cpu; `cuda` without a GPU, or another kind of device (mps, xpu,
    …), is a clear error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = name if isinstance(name, torch.device) else torch.device(name)
    except RuntimeError:
        raise MergeCoreError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in DEVICE_TYPES:
        raise MergeCoreError(f"device '{dev}' is not supported: the exact merges need fp64 and linear-algebra "
                             f"kernels that {dev.type} lacks; use cpu (or a CUDA/ROCm GPU)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeCoreError(f"device '{dev}' requested but no CUDA GPU is available (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MergeCoreError(f"device '{dev}' requested but this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise MergeCoreError(f"device '{dev}': there is one CPU device; use cpu")
    return dev


def host_compute_device(host: torch.device) -> torch.device:
    """The device to compute on for a host application's device (ComfyUI's): itself when CUDA (ROCm) or the
    CPU, else the CPU (mps, directml's privateuseone, xpu, …)."""
    return host if host.type in DEVICE_TYPES else torch.device("cpu")


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
