"""Exact quality of an approximation Â of a target T, from traces of small products.

‖T−Â‖² = ‖T‖² − 2⟨T,Â⟩ + ‖Â‖²;  rel_error = ‖T−Â‖/‖T‖;  energy_kept = 1 − rel_error².
For a truncated SVD, energy_kept = Σ_{i≤k} σᵢ² / ‖T‖_F².
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .operators import Operator, frob2, inner


@dataclass(frozen=True)
class Quality:
    rel_error: float
    energy_kept: float

    def as_dict(self) -> dict:
        return {"rel_error": self.rel_error, "energy_kept": self.energy_kept}


def measure(target: Operator, approx: Operator | None, target_norm2: float | None = None) -> Quality:
    """rel_error and energy_kept of `approx` (None = the zero matrix) against `target`."""
    t2 = frob2(target) if target_norm2 is None else target_norm2
    if t2 <= 0.0:
        if approx is None:
            return Quality(0.0, 1.0)
        a2 = frob2(approx)
        return Quality(0.0 if a2 == 0.0 else math.inf, 1.0)
    if approx is None:
        return Quality(1.0, 0.0)
    err2 = max(0.0, t2 - 2.0 * inner(target, approx) + frob2(approx))
    rel = math.sqrt(err2 / t2)
    return Quality(rel, 1.0 - rel * rel)
