"""LoKr: ΔW = s·kron(w1, w2); w1 = lokr_w1 or w1_a@w1_b; w2 = lokr_w2, w2_a@w2_b, or Tucker
Σ t2[i,j]·w2_b[j] with w2_a [r,c].  s = α/dim with dim the rank of the factorised part (w2's if both are),
and s = 1 when both w1 and w2 are full (α ignored), as ComfyUI applies it.

As a matrix (out × in·kh·kw) the delta is kron(w1, w2.flatten(1)) in every case.  Exact factored form:
with w1 = P₁Q₁ and w2 = P₂Q₂, kron(w1, w2) = kron(P₁,P₂)·kron(Q₁,Q₂) (rank r₁r₂; a full factor uses
(W, I) or (I, W), whichever is thinner).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Extras, Factored, alpha_value, f32, scale_of, tucker_right
from ..errors import FormatError


def thin_pair(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W = P Q with the smaller inner dimension: (W, I) or (I, W)."""
    rows, cols = W.shape
    if cols <= rows:
        return W, torch.eye(cols, dtype=W.dtype, device=W.device)
    return torch.eye(rows, dtype=W.dtype, device=W.device), W


@dataclass
class LoKr(Extras):
    w1: Optional[torch.Tensor] = None
    w1a: Optional[torch.Tensor] = None
    w1b: Optional[torch.Tensor] = None
    w2: Optional[torch.Tensor] = None
    w2a: Optional[torch.Tensor] = None
    w2b: Optional[torch.Tensor] = None
    t2: Optional[torch.Tensor] = None
    alpha: Optional[float] = None

    kind = "lokr"

    def __post_init__(self) -> None:
        if self.w1 is None and (self.w1a is None or self.w1b is None):
            raise FormatError("LoKr module needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2a is None or self.w2b is None):
            raise FormatError("LoKr module needs lokr_w2 or both lokr_w2_a and lokr_w2_b")

    @classmethod
    def from_roles(cls, roles: dict[str, torch.Tensor]) -> "LoKr":
        return cls(w1=roles.get("lokr_w1"), w1a=roles.get("lokr_w1_a"), w1b=roles.get("lokr_w1_b"),
                   w2=roles.get("lokr_w2"), w2a=roles.get("lokr_w2_a"), w2b=roles.get("lokr_w2_b"),
                   t2=roles.get("lokr_t2"), alpha=alpha_value(roles.get("alpha")), **cls.extras_from(roles))

    @property
    def dim(self) -> Optional[int]:
        """Rank of the factorised part (w2's wins when both are factorised); None when both are full."""
        if self.w2 is None:
            return self.w2b.shape[0]
        if self.w1 is None:
            return self.w1b.shape[0]
        return None

    @property
    def rank(self) -> int:
        """Nominal rank for reports: the factorised dim, or 0 for full-full."""
        return self.dim or 0

    @property
    def scale(self) -> float:
        dim = self.dim
        return 1.0 if dim is None else scale_of(self.alpha, dim)

    @property
    def w1_shape(self) -> tuple[int, int]:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])

    @property
    def w2_shape(self) -> tuple[int, ...]:
        """w2's shape: (c, d, kh, kw) when 4-D (full conv or Tucker), (c, d·kh·kw) otherwise."""
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        return (self.w2a.shape[0], self.w2b.shape[1])

    @property
    def native_shape(self) -> tuple[int, ...]:
        (a, b), w2s = self.w1_shape, self.w2_shape
        return (a * w2s[0], b * w2s[1], *w2s[2:])

    def factor1(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(P₁, Q₁) with w1 = P₁Q₁."""
        if self.w1 is not None:
            return thin_pair(f32(self.w1, device))
        return f32(self.w1a, device), f32(self.w1b, device)

    def factor2(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(P₂, Q₂) with w2.flatten(1) = P₂Q₂."""
        if self.w2 is not None:
            return thin_pair(f32(self.w2, device).flatten(1))
        if self.t2 is not None:
            return f32(self.w2a, device).T, tucker_right(f32(self.t2, device), f32(self.w2b, device))
        return f32(self.w2a, device), f32(self.w2b, device).flatten(1)

    def w1_dense(self, device=None) -> torch.Tensor:
        P, Q = self.factor1(device)
        return P @ Q

    def w2_dense(self, device=None) -> torch.Tensor:
        """w2 as a matrix c × (d·kh·kw)."""
        P, Q = self.factor2(device)
        return P @ Q

    def operator(self, device: Optional[torch.device] = None) -> Factored:
        P1, Q1 = (t.contiguous() for t in self.factor1(device))
        P2, Q2 = (t.contiguous() for t in self.factor2(device))
        return Factored(torch.kron(P1, P2) * self.scale, torch.kron(Q1, Q2))

    def tensors(self) -> dict[str, torch.Tensor]:
        names = {"lokr_w1": self.w1, "lokr_w1_a": self.w1a, "lokr_w1_b": self.w1b, "lokr_w2": self.w2,
                 "lokr_w2_a": self.w2a, "lokr_w2_b": self.w2b, "lokr_t2": self.t2}
        out = {k: v for k, v in names.items() if v is not None}
        if self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        return {**out, **self.extra_tensors()}
