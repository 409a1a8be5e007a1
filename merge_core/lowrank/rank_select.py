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
from typing import Optional, Sequence

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


def non_null(S: torch.Tensor) -> torch.Tensor:
    """How many singular values of each row of S (batch × n, descending) stand above round-off: σ > NULL_TOL·σ₁
    (0 for a zero row)."""
    top = S[:, 0] if S.shape[1] else torch.zeros(S.shape[0], dtype=S.dtype)
    return torch.where(top > 0, (S > (top * NULL_TOL)[:, None]).sum(1), 0)


def choose_ranks(S: torch.Tensor, totals: Sequence[float], rule: RankRule, shape: tuple[int, int]) -> list[int]:
    """The rank to keep for each row of singular values S (batch × n, each row descending) of modules of one
    matrix shape (out, in·kh·kw), with exact energies ‖T_b‖² = totals[b] (all rows at once)."""
    s = S.detach().to("cpu", torch.float64)
    total = torch.as_tensor(list(totals), dtype=torch.float64)
    available = non_null(s)
    if rule.rank is not None:
        k = torch.full_like(available, rule.rank)
    else:
        k = available
        if rule.energy < 1.0:  # smallest k with Σ_{i≤k} σᵢ² ≥ energy·‖T‖² (all available if never reached)
            cum = torch.cumsum(s * s, 1) / total.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
            reached = (cum >= rule.energy) & (torch.arange(s.shape[1])[None, :] < available[:, None])
            k = torch.where(reached.any(1), reached.to(torch.int64).argmax(1) + 1, available)
        k = k.clamp(rule.min_rank, rule.max_rank)
    k = torch.minimum(k.clamp_max(min(shape)), available).clamp_min(1)
    return torch.where((available == 0) | (total <= 0.0), 0, k).tolist()


def choose_rank(s: torch.Tensor, total_energy: float, rule: RankRule, shape: tuple[int, int]) -> int:
    """The rank to keep for singular values `s` (descending) of a module of matrix shape (out, in·kh·kw)."""
    return choose_ranks(s.reshape(1, -1), [total_energy], rule, shape)[0]
