"""Linear operators the SVD engine works on, without forming a dense matrix when the input is factored.

Factored: T = U V with U (out×R), V (R×N).  Dense: T = W (out×N).
Both offer T@X, Tᵀ@Y, ‖T‖_F² and inner products ⟨S,T⟩ = trace(SᵀT), all exact.
Inner products and norms are accumulated in fp64 (they are traces of small products: cheap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch

from ..device import COMPUTE_DTYPE


@dataclass(frozen=True)
class Factored:
    """T = U @ V; U (out×R), V (R×N)."""

    U: torch.Tensor
    V: torch.Tensor

    def __post_init__(self) -> None:
        if self.U.ndim != 2 or self.V.ndim != 2 or self.U.shape[1] != self.V.shape[0]:
            raise ValueError(f"factor shapes do not chain: U {tuple(self.U.shape)}, V {tuple(self.V.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[1])

    @property
    def inner_rank(self) -> int:
        return self.U.shape[1]

    @property
    def device(self) -> torch.device:
        return self.U.device

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    def to(self, device: torch.device, dtype: torch.dtype = COMPUTE_DTYPE) -> "Factored":
        return Factored(self.U.to(device=device, dtype=dtype), self.V.to(device=device, dtype=dtype))

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self.U @ (self.V @ X)

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self.V.T @ (self.U.T @ Y)

    def dense(self) -> torch.Tensor:
        return self.U @ self.V

    def scaled(self, c: float) -> "Factored":
        return Factored(self.U * c, self.V)

    def balanced(self) -> "Factored":
        """The same T with each rank-1 term's two norms equal, ‖uᵢ‖ = ‖vᵢ‖ (balancing_gauge)."""
        d = balancing_gauge(self.U.norm(dim=0).square(), self.V.norm(dim=1).square())
        return Factored(self.U * d, self.V / d[:, None])


def balancing_gauge(u_sq: torch.Tensor, v_sq: torch.Tensor) -> torch.Tensor:
    """D = (‖vᵢ‖²/‖uᵢ‖²)^¼ for each rank-1 term uᵢvᵢ of U V, from the squared norms of U's columns and V's rows
    (any leading batch dims): U·D, D⁻¹·V is the same T with ‖uᵢ‖ = ‖vᵢ‖; 1 where a side is zero or not finite."""
    ok = (u_sq > 0) & (v_sq > 0) & torch.isfinite(u_sq) & torch.isfinite(v_sq)
    return torch.where(ok, (v_sq / torch.where(ok, u_sq, 1.0)) ** 0.25, torch.ones_like(u_sq))


@dataclass(frozen=True)
class Dense:
    """T = W (out×N): for full diffs and per-module dense work (TIES, DARE, extraction)."""

    W: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.W.shape[0], self.W.shape[1])

    @property
    def inner_rank(self) -> int:
        return min(self.W.shape)

    @property
    def device(self) -> torch.device:
        return self.W.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W.dtype

    def to(self, device: torch.device, dtype: torch.dtype = COMPUTE_DTYPE) -> "Dense":
        return Dense(self.W.to(device=device, dtype=dtype))

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self.W @ X

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self.W.T @ Y

    def dense(self) -> torch.Tensor:
        return self.W

    def scaled(self, c: float) -> "Dense":
        return Dense(self.W * c)


Operator = Union[Factored, Dense]


def weighted_sum(terms: Sequence[tuple[float, Operator]]) -> Operator:
    """Σ wᵢ Tᵢ. All factored -> stacked factors [w₁U₁ … wₙUₙ][V₁; …; Vₙ] (exact, rank Σ Rᵢ);
    any dense term -> one dense matrix (the module is dense anyway)."""
    if not terms:
        raise ValueError("weighted_sum of no terms")
    shapes = {op.shape for _, op in terms}
    if len(shapes) != 1:
        raise ValueError(f"cannot add operators of shapes {sorted(shapes)}")
    if all(isinstance(op, Factored) for _, op in terms):
        U = torch.cat([op.U * w for w, op in terms], dim=1)
        V = torch.cat([op.V for _, op in terms], dim=0)
        return Factored(U, V)
    W = sum(w * op.dense() for w, op in terms)
    return Dense(W)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


F64_CHUNK = 1 << 18  # elements cast to fp64 at a time (2 MiB): exact sums without an fp64 copy of a dense matrix


def row_blocks(rows: int, cols: int, entries: int) -> Iterator[slice]:
    """Slices of whole rows of a rows × cols matrix, about `entries` entries each (at least one row)."""
    step = max(1, entries // max(1, cols))
    return (slice(i, min(i + step, rows)) for i in range(0, rows, step))


def _row_chunks(W: torch.Tensor) -> Iterator[slice]:
    return row_blocks(W.shape[0], W.shape[1], F64_CHUNK)


def inner(a: Operator, b: Operator) -> float:
    """⟨A,B⟩_F = trace(AᵀB), exact (fp64), from small products when factored; a dense matrix is read in
    fp64 chunks of rows, never copied whole."""
    if isinstance(a, Factored) and isinstance(b, Factored):
        # trace(Vaᵀ Uaᵀ Ub Vb) = Σ (UaᵀUb) ⊙ (Va Vbᵀ)
        g_u = _f64(a.U).T @ _f64(b.U)
        g_v = _f64(a.V) @ _f64(b.V).T
        return float((g_u * g_v).sum())
    if isinstance(a, Dense) and isinstance(b, Dense):
        return sum(float((_f64(a.W[r]) * _f64(b.W[r])).sum()) for r in _row_chunks(a.W))
    d, f = (a, b) if isinstance(a, Dense) else (b, a)
    # trace(Wᵀ U V) = Σ (Uᵀ W) ⊙ V, UᵀW summed over chunks of rows
    uw = sum(_f64(f.U[r]).T @ _f64(d.W[r]) for r in _row_chunks(d.W))
    return float((uw * _f64(f.V)).sum())


def frob2(a: Operator) -> float:
    """‖A‖_F² exactly; for factored A: trace((UᵀU)(VVᵀ)); dense: fp64 over chunks (no fp64 copy of W)."""
    if isinstance(a, Dense):
        return sum(float(torch.linalg.vector_norm(a.W[r], dtype=torch.float64)) ** 2 for r in _row_chunks(a.W))
    return inner(a, a)
