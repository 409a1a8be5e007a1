"""Each input's factors with its coefficient folded in, as concat and geometric_mean use them.

For a module with ΔW = s·P₀Q₀ (s = α/r for LoRA, the adapter's own scale for LoHa/LoKr, whose exact
factored form comes from .operator()) and coefficient c = w·block weight:
    P = sign(c·s)·√|c·s|·P₀,   Q = √|c·s|·Q₀,   so P Q = c·ΔW,
i.e. the magnitude is split evenly between the factors and the sign rides on the up factor.
A full (dense) diff W is written exactly as (c·W, I) or (c·I, W), whichever is thinner.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..adapters.lokr import thin_pair
from ..lowrank import Dense
from .targets import Term


def signed_split(term: Term, device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(P, Q) with P @ Q = c·ΔW as described above; None when c·ΔW is zero by its scale."""
    op = term.module.operator(device)
    if isinstance(op, Dense):
        return thin_pair(op.W * term.coeff)
    scale = float(getattr(term.module, "scale", 1.0))
    g = math.sqrt(abs(term.coeff * scale))
    if g == 0.0:
        return None
    # op.U already carries s: op.U·(c/g) = sign(c·s)·g·P₀
    return op.U * (term.coeff / g), op.V * g
