"""concat: the exact merge.  Σ cᵢ ΔWᵢ = [P₁ … Pₙ] [Q₁; …; Qₙ] with each input's cᵢ·αᵢ/rᵢ folded into its
factors (factors.py: √ on each side, sign on up), written with α = total rank (scale 1), each rank-1 term
then balanced, ‖up column‖ = ‖down row‖ (Factored.balanced: the product is unchanged), so an input stored
with a large up and a small down (or the reverse) still fits fp16 when its ΔW does.

Rank Σ rᵢ over the inputs with a non-zero coefficient; LoHa/LoKr inputs enter in their exact factored
form (rank r₁r₂ for LoHa).  Adding factors instead, (ΣBᵢ)(ΣAᵢ), would add cross terms BᵢAⱼ.
"""
from __future__ import annotations

import torch

from ..adapters.base import finite_sum
from ..lowrank import Factored
from .factors import signed_split
from .options import MergeOptions
from .outcome import EXACT, NOT_FINITE, Outcome, combine_notes, lora_outcome
from .targets import ModuleTarget


def merge_concat(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> Outcome:
    pairs = [p for p in (signed_split(t, device) for t in target.weighted) if p is not None]
    if not pairs:
        return lora_outcome(target, None, None, EXACT, device, combine_notes("zero delta", target.note))
    op = Factored(torch.cat([p for p, _ in pairs], dim=1), torch.cat([q for _, q in pairs], dim=0)).balanced()
    return lora_outcome(target, op.U, op.V, EXACT if finite_sum(op.U, op.V) else NOT_FINITE, device, target.note)
