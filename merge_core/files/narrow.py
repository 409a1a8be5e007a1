"""Casting to a file's dtype without silent overflow: a finite fp32 value beyond fp16's ±65504 (or bf16's
±3.4e38) would become ±inf in the file, a LoRA that breaks every image it touches."""
from __future__ import annotations

import math

import torch

from ..errors import NonFiniteError


def _overflow_at(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to ±inf in dtype: max + half its last step (fp16: 65520)."""
    info = torch.finfo(dtype)
    return info.max + info.eps * info.max / (2 * (2 - info.eps))


def narrowed(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """tensor.to(dtype); a NonFiniteError naming `what` when a finite value does not fit dtype (NaN and ±inf
    are the caller's to refuse).  One min/max pass: several times cheaper than an isinf pass over the result."""
    if (tensor.is_floating_point() and dtype.is_floating_point and tensor.numel()
            and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max):
        lo, hi = torch.aminmax(tensor.detach())
        peak = max(-float(lo), float(hi))
        if _overflow_at(dtype) <= peak < math.inf:
            wider = "fp32 or bf16" if dtype == torch.float16 else "fp32"
            raise NonFiniteError(f"{what} holds values up to {peak:.6g}, beyond {str(dtype).replace('torch.', '')}'s "
                                 f"range (±{torch.finfo(dtype).max:.5g}); save it as {wider}; nothing was written")
    return tensor.to(dtype)
