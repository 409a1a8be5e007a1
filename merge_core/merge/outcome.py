"""One merged module as the methods return it, and how factors become a written module.

Every method's output is a LoRA/LoCon with α = rank (scale 1): ΔŴ = up @ down, plus the exact sum of
the inputs' bias deltas.  A module whose result has rank 0 (an all-zero target) is left out of the file
unless it carries a bias delta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..adapters import AdapterModule, FullDiff, LoRA
from ..lowrank import Quality
from .targets import ModuleTarget

EXACT = Quality(0.0, 1.0)
NOT_FINITE = Quality(math.nan, math.nan)  # the engine turns it into an error naming the damaged input


@dataclass(frozen=True)
class Outcome:
    module: Optional[AdapterModule]
    rank: int
    quality: Quality
    note: str = ""


def cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to("cpu").contiguous()


def lora_outcome(target: ModuleTarget, up: Optional[torch.Tensor], down: Optional[torch.Tensor],
                 quality: Quality, device: torch.device, note: str = "") -> Outcome:
    """up (out×k) @ down (k×in·kh·kw) as a module of the target's weight shape, with the summed bias."""
    bias = cpu(target.bias(device))
    if up is None or up.shape[1] == 0:
        module = FullDiff(None, diff_b=bias) if bias is not None else None
        return Outcome(module, 0, quality, note)
    module = LoRA.from_factors(cpu(up), cpu(down), target.weight_shape, diff_b=bias)
    return Outcome(module, module.rank, quality, note)


def exact_sum_outcome(target: ModuleTarget, device: torch.device) -> Outcome:
    """Vector-only modules (bias deltas, 1-D diffs of norm layers): Σ cᵢ diffᵢ, exact, as a full diff."""
    diffs = [t.coeff * t.module.diff.to(device=device, dtype=torch.float32) for t in target.weighted]
    diff = cpu(sum(diffs)) if diffs else None
    return Outcome(FullDiff(diff, diff_b=cpu(target.bias(device))), 0, EXACT, "exact sum")


def combine_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)
