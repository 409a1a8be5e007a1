"""Ranks under a size budget: the per-module ranks that keep the most energy in a given number of bytes.

    maximize Σₘ Σ_{i≤kₘ} σ²ₘᵢ   subject to   Σₘ kₘ·cₘ ≤ B,   lowₘ ≤ kₘ ≤ highₘ

cₘ = (out + in·kh·kw) × bytes per element is what one unit of rank costs module m; B is what the file has
left once the header and the tensors that do not depend on rank are counted; lowₘ and highₘ are the rank
rule's bounds (never more than the module's non-null singular values).  Minimising the total squared error
Σₘ‖Tₘ − T̂ₘ‖² is the same problem.  It is solved greedily from every module at lowₘ, by gain per byte
σ²ₘ,ₖ₊₁/cₘ: a module's gains fall as k grows, so the greedy is the optimum of the continuous relaxation and
its integer solution is within one rank step of the best (a step that did not fit).  Merges
(merge/budget.py) and extractions (extract/budget.py) find the spectra; this allocates.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import MergeCoreError
from .rank_select import RankRule, non_null


@dataclass(frozen=True)
class Spectrum:
    """One module's place in the budget: σ² (descending, non-null ones only), ‖T‖², bytes per unit of rank."""

    name: str
    sq: tuple[float, ...]
    total: float
    cost: int
    low: int
    high: int


def allocate(spectra: Sequence[Spectrum], budget: int) -> dict[str, int]:
    """Ranks maximising the kept Σσ² within `budget` bytes (greedy by gain per byte; see the module docstring)."""
    ranks = {s.name: s.low for s in spectra}
    spent = sum(s.low * s.cost for s in spectra)
    if spent > budget:
        raise MergeCoreError(f"the budget is too small: every module at its minimum rank already takes "
                             f"{spent:,} bytes of tensors, {budget:,} bytes are left after the header and fixed "
                             "tensors; lower --min-rank or raise --target-size")
    heap = [(-s.sq[s.low] / s.cost, i) for i, s in enumerate(spectra) if s.low < s.high]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        s = spectra[i]
        if spent + s.cost > budget:
            continue  # its later steps cost the same: the module stays where it is
        k = ranks[s.name] = ranks[s.name] + 1
        spent += s.cost
        if k < s.high:
            heapq.heappush(heap, (-s.sq[k] / s.cost, i))
    return ranks


def kept(spectra: Sequence[Spectrum], ranks: dict[str, int]) -> float:
    """Σ of the kept σ² over Σ‖T‖² (1 for an all-zero merge)."""
    total = sum(s.total for s in spectra)
    return sum(sum(s.sq[:ranks[s.name]]) for s in spectra) / total if total > 0 else 1.0


def uniform(spectra: Sequence[Spectrum], budget: int) -> Optional[int]:
    """The largest rank u such that every module at clamp(u, low, high) fits in `budget` (None: not even 1)."""
    best, top = None, max((s.high for s in spectra), default=0)
    for u in range(1, top + 1):
        if sum(min(max(u, s.low), s.high) * s.cost for s in spectra) > budget:
            break
        best = u
    return best


def spectrum(name: str, s: torch.Tensor, total: float, shape: tuple[int, int], bytes_per_element: int,
             rule: RankRule, cap: Optional[int] = None) -> Spectrum:
    """A module's Spectrum from its singular values `s` (descending; the top ones are enough), ‖T‖² and matrix
    shape: the non-null σ² (as choose_ranks counts them), bounds from `rule` (and `cap`)."""
    available = int(non_null(s.reshape(1, -1))[0]) if total > 0 else 0
    high = min(rule.max_rank, available, min(shape), cap if cap is not None else available)
    return Spectrum(name, tuple(float(x) ** 2 for x in s[:available]), float(total), sum(shape) * bytes_per_element,
                    min(rule.min_rank, high), high)


def check_room(target_bytes: int, fixed: int) -> None:
    """A one-line error when the bytes that do not depend on rank (`fixed`) leave no room in the target."""
    if fixed >= target_bytes:
        raise MergeCoreError(f"the budget is too small: the header and the tensors that do not depend on rank "
                             f"already take {fixed:,} bytes; raise --target-size")


def fit(spectra: Sequence[Spectrum], target_bytes: int, fixed: int, energy_of: str) -> tuple[dict[str, int], dict]:
    """(ranks, summary): the allocation in target_bytes − fixed, and what the report and the CLI show."""
    check_room(target_bytes, fixed)
    budget = target_bytes - fixed
    ranks = allocate(spectra, budget)
    u = uniform(spectra, budget)
    chosen = [ranks[s.name] for s in spectra]
    return ranks, {"target_bytes": int(target_bytes), "energy_of": energy_of,
                   "file_bytes": fixed + sum(ranks[s.name] * s.cost for s in spectra),
                   "min_rank": min(chosen, default=0), "max_rank": max(chosen, default=0),
                   "avg_rank": sum(chosen) / len(chosen) if chosen else 0.0,
                   "energy_kept": kept(spectra, ranks), "uniform_rank": u,
                   "uniform_energy_kept": kept(spectra, {s.name: min(max(u, s.low), s.high) for s in spectra})
                   if u is not None else None}
