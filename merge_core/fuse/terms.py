"""One input's contribution to one module: its exact operator and the exact scalars the strategies need.

LoKr deltas s·kron(w1, w2) use the Kronecker identities, so no kron is ever formed for them:
‖s·kron(A,B)‖² = s²‖A‖²‖B‖²,  1ᵀkron(A,B)1 = (1ᵀA1)(1ᵀB1),  max|kron(A,B)| = max|A|·max|B|,
⟨kron(A,B), kron(C,D)⟩ = ⟨A,C⟩⟨B,D⟩.
Every other kind uses its exact factored operator (LoHa: face-splitting form):
‖UV‖² = trace((UᵀU)(VVᵀ)),  1ᵀUV1 = (1ᵀU)(V1).  All scalars are accumulated in fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch

from ..adapters import AdapterModule, LoHa, LoKr
from ..adapters.base import f32
from ..lowrank import Dense, Factored, Operator, frob2
from ..lowrank.operators import F64_CHUNK, row_blocks

F64 = torch.float64


@dataclass(frozen=True)
class KronParts:
    """ΔW = scale·kron(w1, w2) as a matrix; w1 dense (a×b), w2 = P Q (c × d·kh·kw)."""

    scale: float
    w1: torch.Tensor
    w2: Factored
    w2_rank: Optional[int]  # rank of a factorised (or Tucker) w2; None when w2 is stored full
    w2_shape: tuple[int, ...]  # w2 as stored when full (may be 4-D for conv)

    @property
    def shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple(self.w1.shape), self.w2.shape


def kron_parts(module: LoKr, device: Optional[torch.device] = None) -> KronParts:
    P, Q = module.factor2(device)
    return KronParts(module.scale, module.w1_dense(device), Factored(P, Q),
                     None if module.w2 is not None else module.w2b.shape[0], module.w2_shape)


class Term:
    """Input `index`'s module for one fused module, with cached exact operator and statistics."""

    def __init__(self, index: int, module: AdapterModule, device: torch.device):
        self.index = index
        self.module = module
        self.device = device

    @property
    def has_weight(self) -> bool:
        """False for a full diff that carries only a bias delta."""
        return getattr(self.module, "has_weight", True)

    @cached_property
    def op(self) -> Operator:
        return self.module.operator(self.device)

    @cached_property
    def kron(self) -> Optional[KronParts]:
        return kron_parts(self.module, self.device) if isinstance(self.module, LoKr) else None

    @property
    def size(self) -> int:
        """Number of entries n of ΔW (out·in·kh·kw)."""
        return math.prod(self.module.matrix_shape)

    @cached_property
    def norm2(self) -> float:
        """‖ΔW‖_F²."""
        if self.kron is not None:
            k = self.kron
            return k.scale ** 2 * float(k.w1.to(F64).square().sum()) * frob2(k.w2)
        if _dense_is_cheaper(self.module):  # ΔW's rows a block at a time: nothing of its size is held
            out, n = self.module.matrix_shape
            return sum(frob2(Dense(self._loha_rows(rows))) for rows in row_blocks(out, n, F64_CHUNK))
        return frob2(self.op)

    @cached_property
    def entry_sum(self) -> float:
        """1ᵀ ΔW 1, the sum of all entries."""
        if self.kron is not None:
            k = self.kron
            return k.scale * float(k.w1.to(F64).sum()) * _sum_of(k.w2)
        return _sum_of(self.op)

    @cached_property
    def variance(self) -> float:
        """Population variance of ΔW's entries: ‖ΔW‖²/n − (1ᵀΔW1/n)² (clamped at 0 against round-off)."""
        n = self.size
        return max(0.0, self.norm2 / n - (self.entry_sum / n) ** 2)

    @cached_property
    def max_abs(self) -> float:
        """max |ΔW| (LoKr: |s|·max|w1|·max|w2|; others from the dense module, one at a time)."""
        if self.kron is not None:
            k = self.kron
            return abs(k.scale) * float(k.w1.abs().max()) * float(k.w2.dense().abs().max())
        return float(self.dense().abs().max())

    def dense(self) -> torch.Tensor:
        """ΔW as a dense matrix (out × in·kh·kw), by the cheapest exact route for its kind (not cached)."""
        if self.kron is not None:
            k = self.kron
            return torch.kron(k.w1 * k.scale, k.w2.dense())
        m = self.module
        if _dense_loha(m):
            return self._loha_rows(slice(None))
        return self.op.dense()

    @cached_property
    def _loha_factors(self) -> tuple[torch.Tensor, ...]:
        m = self.module
        return tuple(f32(t, self.device).flatten(1) for t in (m.w1a, m.w1b, m.w2a, m.w2b))

    def _loha_rows(self, rows: slice) -> torch.Tensor:
        """Rows of a plain LoHa's ΔW = (α/r)(w1a@w1b)⊙(w2a@w2b): 2(r₁+r₂) flops per entry, not 2r₁r₂."""
        w1a, w1b, w2a, w2b = self._loha_factors
        return (w1a[rows] @ w1b).mul_(w2a[rows] @ w2b).mul_(self.module.scale)


def _dense_loha(module: AdapterModule) -> bool:
    """A LoHa whose dense ΔW is two products and a Hadamard one (no Tucker cores)."""
    return isinstance(module, LoHa) and not module.tucker


def _dense_is_cheaper(module: AdapterModule) -> bool:
    """For ‖ΔW‖² of a LoHa: forming ΔW takes 2(r₁+r₂)·out·n flops, the face-split Grams 2(r₁r₂)²(out+n) in fp64
    (at half the speed)."""
    if not _dense_loha(module):
        return False
    (out, n), r1, r2 = module.matrix_shape, module.w1b.shape[0], module.w2b.shape[0]
    return (r1 + r2) * out * n < 2 * (r1 * r2) ** 2 * (out + n)


def _sum_of(op: Operator) -> float:
    if isinstance(op, Factored):
        return float((op.U.to(F64).sum(0) * op.V.to(F64).sum(1)).sum())
    return float(op.W.to(F64).sum())


def kron_compatible(a: Term, b: Term) -> bool:
    return a.kron is not None and b.kron is not None and a.kron.shapes == b.kron.shapes



def dense_sum(terms: Sequence[Term], coeffs: Sequence[float]) -> torch.Tensor:
    """Σ cᵢ ΔWᵢ as one dense matrix, built one term at a time."""
    total = None
    for c, t in zip(coeffs, terms):
        d = t.dense()
        total = d * c if total is None else total.add_(d, alpha=c)  # never in place on an input's tensor
    return total
