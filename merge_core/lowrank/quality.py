"""Exact quality of an approximation Â of a target T, from traces of small products.

‖T−Â‖² = ‖T‖² − 2⟨T,Â⟩ + ‖Â‖²;  rel_error = ‖T−Â‖/‖T‖;  energy_kept = 1 − rel_error².
For a truncated SVD, energy_kept = Σ_{i≤k} σᵢ² / ‖T‖_F².
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def truncated(S: torch.Tensor, k: int, total: float) -> Quality:
    """Quality of the rank-k truncation of an SVD of P·T (P an orthogonal projection, as rSVD's QQᵀ; or I), from
    σ alone: ‖T − Â_k‖² = ‖T‖² − Σ_{i≤k} σᵢ², since Â_k = P_k T with P_k an orthogonal projection."""
    if total <= 0.0:
        return Quality(0.0, 1.0)
    kept = min(1.0, float(S[:k].double().square().sum()) / total)
    return Quality(math.sqrt(1.0 - kept), kept)
