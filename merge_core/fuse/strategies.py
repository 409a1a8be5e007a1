"""The five fusion strategies, each a set of coefficients cᵢ per module: the fused delta is T = Σ cᵢ ΔWᵢ.

Every strategy is defined on the module deltas ΔWᵢ (never on raw factors) with user weights wᵢ; a model
that lacks the module contributes ΔW = 0 there.  With k the number of models whose ΔWᵢ ≠ 0:
- weighted_sum:      cᵢ = wᵢ
- weighted_average:  cᵢ = wᵢ / Σⱼwⱼ (Σ over all models, so the result is the average of the patched models)
- layer_adaptive:    cᵢ = wᵢ·k·aᵢ/Σⱼaⱼ, aᵢ = 1/Var(ΔWᵢ)  (inverse variance; mean factor 1, not renormalised)
- smart_fusion:      cᵢ = wᵢ·k·‖ΔWᵢ‖/Σⱼ‖ΔWⱼ‖              (L2 importance; mean factor 1)
- min_max_norm:      cᵢ = γ·wᵢ, γ = min(1, τ·maxᵢ max|ΔWᵢ| / max|Σ wⱼΔWⱼ|)  (scaled, never shifted)
Var(ΔW) is the population variance of the entries: ‖ΔW‖²/n − (1ᵀΔW1/n)², both exact from the factors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import MergeCoreError
from .terms import Term, dense_sum

STRATEGIES = ("weighted_sum", "weighted_average", "layer_adaptive", "smart_fusion", "min_max_norm")
# a variance this far below the module's largest counts as this floor (a constant, non-zero ΔW)
VARIANCE_FLOOR = 1e-12


@dataclass(frozen=True)
class Coefficients:
    values: list[float]  # cᵢ, one per term, in the terms' order
    note: str = ""


def check_strategy(strategy: str, weights: Sequence[float], norm_threshold: float) -> None:
    """Refuse what no module could compute, before any work starts."""
    if strategy not in STRATEGIES:
        raise MergeCoreError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "weighted_average" and sum(weights) == 0.0:
        raise MergeCoreError("weights sum to 0: weighted_average (Σ wᵢΔWᵢ / Σ wᵢ) is undefined")
    if strategy == "min_max_norm" and not norm_threshold > 0.0:
        raise MergeCoreError(f"--norm-threshold must be > 0, got {norm_threshold}")


def relative_factors(scores: Sequence[float], active: Sequence[bool]) -> list[float]:
    """k·scoreᵢ/Σ score over the k active terms (mean 1); inactive terms get 0."""
    total = sum(s for s, a in zip(scores, active) if a)
    k = sum(active)
    if total <= 0.0:
        return [1.0 if a else 0.0 for a in active]
    return [k * s / total if a else 0.0 for s, a in zip(scores, active)]


def inverse_variance_scores(terms: Sequence[Term]) -> list[float]:
    variances = [t.variance for t in terms]
    floor = VARIANCE_FLOOR * max(variances, default=0.0)
    return [1.0 / max(v, floor) if floor > 0.0 else 1.0 for v in variances]


def min_max_scale(terms: Sequence[Term], weights: Sequence[float], threshold: float) -> float:
    """γ so that max|γ Σ wᵢΔWᵢ| ≤ τ·maxᵢ max|ΔWᵢ| (γ ≤ 1; the weighted sum is densified for its max)."""
    limit = threshold * max(t.max_abs for t in terms)
    peak = float(dense_sum(terms, weights).abs().max())
    return 1.0 if peak <= limit or peak == 0.0 else limit / peak


def coefficients(strategy: str, terms: Sequence[Term], weights: Sequence[float], weight_total: float,
                 norm_threshold: float = 1.0) -> Coefficients:
    """cᵢ for one module; `weights` are the user weights of the terms' models, `weight_total` Σ of all."""
    w = list(weights)
    if strategy == "weighted_sum":
        return Coefficients(w)
    if strategy == "weighted_average":
        return Coefficients([x / weight_total for x in w])
    active = [t.norm2 > 0.0 for t in terms]
    if strategy == "layer_adaptive":
        factors = relative_factors(inverse_variance_scores(terms), active)
        return Coefficients([x * f for x, f in zip(w, factors)], _factor_note(factors, active))
    if strategy == "smart_fusion":
        factors = relative_factors([t.norm2 ** 0.5 for t in terms], active)
        return Coefficients([x * f for x, f in zip(w, factors)], _factor_note(factors, active))
    if strategy == "min_max_norm":
        gamma = min_max_scale(terms, w, norm_threshold)
        return Coefficients([gamma * x for x in w], f"scaled x{gamma:.4g}" if gamma < 1.0 else "")
    raise MergeCoreError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def _factor_note(factors: Sequence[float], active: Sequence[bool]) -> str:
    return "factors " + "/".join(f"{f:.3g}" for f, a in zip(factors, active) if a) if sum(active) > 1 else ""
