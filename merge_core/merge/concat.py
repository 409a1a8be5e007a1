"""concat: the exact merge.  Σ cᵢ ΔWᵢ = [P₁ … Pₙ] [Q₁; …; Qₙ] with each input's cᵢ·αᵢ/rᵢ folded into its
factors (factors.py: √ on each side, sign on up), written with α = total rank (scale 1).

Rank Σ rᵢ over the inputs with a non-zero coefficient; LoHa/LoKr inputs enter in their exact factored
form (rank r₁r₂ for LoHa).  Adding factors instead, (ΣBᵢ)(ΣAᵢ), would add cross terms BᵢAⱼ.
"""
from __future__ import annotations

import torch

from ..adapters.base import finite_sum
from .factors import signed_split
from .options import MergeOptions
from .outcome import EXACT, NOT_FINITE, Outcome, combine_notes, lora_outcome
from .targets import ModuleTarget


def merge_concat(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> Outcome:
    pairs = [p for p in (signed_split(t, device) for t in target.weighted) if p is not None]
    if not pairs:
        return lora_outcome(target, None, None, EXACT, device, combine_notes("zero delta", target.note))
    up = torch.cat([p for p, _ in pairs], dim=1)
    down = torch.cat([q for _, q in pairs], dim=0)
    return lora_outcome(target, up, down, EXACT if finite_sum(up, down) else NOT_FINITE, device, target.note)
