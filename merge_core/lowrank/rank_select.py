"""Rank selection: a fixed rank, or the smallest k whose singular values hold a share of the energy.

dynamic k = min{k : Σ_{i≤k} σᵢ² / ‖T‖_F² ≥ energy}, clamped to [min_rank, max_rank], then to
min(out, in·kh·kw) and to the number of singular values that exist. ‖T‖_F² is exact (from the factors),
so the rule is exact even when only the top singular values were computed.

Edge cases (documented in the README):
- energy ≥ 1.0 keeps every numerically non-zero singular value (up to max_rank);
- a rank above min(out, in·kh·kw) is clamped to it;
- fewer non-zero singular values than min_rank: the module keeps only those it has (never padded
  with zeros, never an IndexError);
- an all-zero module gets rank 0 and is left out of the written file (reported with rank 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import MergeCoreError

# singular values below this fraction of σ₁ are round-off of an exactly lower-rank matrix
NULL_TOL = 1e-6


@dataclass(frozen=True)
class RankRule:
    """`rank` fixed, or dynamic by `energy` within [min_rank, max_rank]."""

    rank: Optional[int] = None
    energy: float = 0.99
    min_rank: int = 4
    max_rank: int = 32

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise MergeCoreError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 < self.energy <= 1.0:
            raise MergeCoreError(f"energy threshold must be in (0, 1], got {self.energy}")
        if self.min_rank < 1 or self.max_rank < self.min_rank:
            raise MergeCoreError(f"need 1 <= min_rank <= max_rank, got {self.min_rank}..{self.max_rank}")

    @property
    def sketch_rank(self) -> int:
        """How many singular values a partial (randomized) SVD must deliver for this rule."""
        return self.rank if self.rank is not None else self.max_rank

    def describe(self) -> dict:
        if self.rank is not None:
            return {"rank": self.rank}
        return {"energy": self.energy, "min_rank": self.min_rank, "max_rank": self.max_rank}


def nonzero_count(s: torch.Tensor) -> int:
    """Singular values above round-off (s descending)."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > float(s[0]) * NULL_TOL).sum())


def energy_rank(s: torch.Tensor, total_energy: float, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ energy·total (all of s if never reached)."""
    available = nonzero_count(s)
    if available == 0 or total_energy <= 0.0:
        return 0
    if energy >= 1.0:
        return available
    cum = torch.cumsum(s[:available].to(torch.float64) ** 2, dim=0) / total_energy
    reached = torch.nonzero(cum >= energy)
    return int(reached[0]) + 1 if reached.numel() else available


def choose_rank(s: torch.Tensor, total_energy: float, rule: RankRule, shape: tuple[int, int]) -> int:
    """The rank to keep for singular values `s` of a module of matrix shape (out, in·kh·kw)."""
    available = nonzero_count(s)
    if available == 0 or total_energy <= 0.0:
        return 0
    if rule.rank is not None:
        k = rule.rank
    else:
        k = min(max(energy_rank(s, total_energy, rule.energy), rule.min_rank), rule.max_rank)
    return max(1, min(k, shape[0], shape[1], available))
