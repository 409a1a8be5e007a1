"""Low-rank approximation of one module's target: SVD by the chosen solver, rank by the rule, quality.

solvers: "exact" (QR-core, factored inputs), "rsvd" (randomized, matrix-free), "dense" (reference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..errors import NonFiniteError
from .dense_svd import dense_svd
from .exact_svd import factored_svd
from .operators import Dense, Factored, Operator, frob2
from .quality import Quality, measure, truncated
from .rank_select import RankRule, choose_rank
from .rsvd import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, randomized_svd
from .svd_result import SVD

Solver = Literal["exact", "rsvd", "dense"]
SOLVERS = ("rsvd", "exact", "dense")


@dataclass(frozen=True)
class LowRank:
    """T ≈ up @ down (up out×k, down k×N, scale 1); up/down are None when k = 0."""

    up: Optional[torch.Tensor]
    down: Optional[torch.Tensor]
    rank: int
    quality: Quality
    singular_values: torch.Tensor

    def factored(self) -> Optional[Factored]:
        return None if self.rank == 0 else Factored(self.up, self.down)

    @classmethod
    def zero(cls, total: float, singular_values: torch.Tensor) -> "LowRank":
        """Rank 0 for a target of ‖T‖² = total: exact when T = 0, else nothing of T kept."""
        return cls(None, None, 0, Quality(0.0, 1.0) if total <= 0 else Quality(1.0, 0.0), singular_values)


def finite_total(op: Operator) -> float:
    """‖T‖² (fp64), or a NonFiniteError when T holds NaN/inf: before any SVD, which would fail on it (noisily)."""
    return finite(frob2(op))


def finite(total: float) -> float:
    """`total` (a ‖T‖²), or a NonFiniteError when it is NaN/inf: T holds NaN/inf."""
    if not math.isfinite(total):
        raise NonFiniteError("the matrix to factor holds NaN or infinite values")
    return total


def svd_of(op: Operator, solver: Solver, rule: RankRule, seed: int = 0,
           oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS) -> SVD:
    """Singular triplets of `op` by `solver`; exact QR-core needs factored input (dense input -> full SVD) and
    forms only the vectors the rule can keep."""
    if solver == "dense":
        return dense_svd(op)
    if solver == "exact":
        return factored_svd(op, rule.sketch_rank) if isinstance(op, Factored) else dense_svd(op)
    if solver == "rsvd":
        return randomized_svd(op, rule.sketch_rank, oversample=oversample, power_iters=power_iters, seed=seed)
    raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")


def truncate(svd: SVD, total: float, rule: RankRule, shape: tuple[int, int],
             measured: Optional[Operator] = None) -> LowRank:
    """The rank-k truncation of `svd` (k from `rule` on ‖T‖² = total) with its exact error: from σ (every solver
    here returns up·down = P·T with P an orthogonal projector; quality.truncated), or by traces against
    `measured` (T itself) when given."""
    k = choose_rank(svd.S, total, rule, shape)
    if k == 0:
        return LowRank.zero(total, svd.S)
    up, down = svd.split_factors(k)
    quality = truncated(svd.S, k, total) if measured is None else measure(measured, Factored(up, down), total)
    return LowRank(up, down, k, quality, svd.S)


def low_rank(op: Operator, rule: RankRule, solver: Solver = "rsvd", seed: int = 0,
             oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS) -> LowRank:
    """Best rank-k factors of `op` (k from `rule` on the exact ‖T‖²) with their exact quality: for the complete
    SVDs (exact, dense) ‖T‖² = Σσᵢ² and the error is the tail of σ; for rsvd, ‖T‖² and the error from traces."""
    if solver != "rsvd":
        svd = svd_of(op, solver, rule, seed)
        return truncate(svd, finite(float(svd.S.double().square().sum())), rule, op.shape)
    total = finite_total(op)  # first: no sketch of NaN/inf
    return truncate(svd_of(op, solver, rule, seed, oversample, power_iters), total, rule, op.shape, measured=op)


__all__ = ["LowRank", "Solver", "SOLVERS", "finite_total", "low_rank", "svd_of", "truncate", "Dense", "Factored"]
