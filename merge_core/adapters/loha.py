"""LoHa: ΔW = (α/r)·(w1a@w1b) ⊙ (w2a@w2b), r = w1b.shape[0]; Tucker: branch = Σ t[i,j]·w_b[j] with w_a [r,out].

Exact factored form (face-splitting): (U₁V₁) ⊙ (U₂V₂) = (U₁ ∗ U₂)(V₁ᵀ ∗ V₂ᵀ)ᵀ, rank ≤ r₁r₂, where ∗ is the
row-wise Kronecker product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import FormatError
from .base import Extras, Factored, alpha_value, check_chain, f32, factor, scale_of, tucker_right


def face_split(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker: (A ∗ B)[p, i·r₂+j] = A[p,i]·B[p,j]."""
    return (A[:, :, None] * B[:, None, :]).reshape(A.shape[0], -1)


@dataclass
class LoHa(Extras):
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: Optional[float] = None
    t1: Optional[torch.Tensor] = None
    t2: Optional[torch.Tensor] = None

    kind = "loha"

    @classmethod
    def from_roles(cls, roles: dict[str, torch.Tensor]) -> "LoHa":
        w = {n: factor(roles, n, "LoHa") for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        if "hada_t1" not in roles:  # (Tucker factors are stored rank-first)
            check_chain("LoHa", *list(w.items())[:2])
            check_chain("LoHa", *list(w.items())[2:])
            shapes = [(w[f"hada_w{i}_a"].shape[0], w[f"hada_w{i}_b"][0].numel()) for i in (1, 2)]
            if shapes[0] != shapes[1]:
                raise FormatError(f"LoHa branches differ in shape: {shapes[0]} and {shapes[1]}")
        return cls(*w.values(), alpha=alpha_value(roles.get("alpha")), t1=roles.get("hada_t1"),
                   t2=roles.get("hada_t2"), **cls.extras_from(roles))

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank)

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    @property
    def native_shape(self) -> tuple[int, ...]:
        if self.tucker:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], self.w1b.shape[1])

    def _branch(self, a: torch.Tensor, b: torch.Tensor, t: Optional[torch.Tensor], device) -> Factored:
        if t is not None:
            return Factored(f32(a, device).T, tucker_right(f32(t, device), f32(b, device)))
        return Factored(f32(a, device), f32(b, device).flatten(1))

    def operator(self, device: Optional[torch.device] = None) -> Factored:
        one = self._branch(self.w1a, self.w1b, self.t1, device)
        two = self._branch(self.w2a, self.w2b, self.t2, device)
        U = face_split(one.U, two.U) * self.scale
        V = face_split(one.V.T, two.V.T).T
        return Factored(U, V)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        if self.tucker:
            out.update(hada_t1=self.t1, hada_t2=self.t2)
        if self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        return {**out, **self.extra_tensors()}
