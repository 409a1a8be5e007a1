"""Nearest Kronecker product (Van Loan–Pitsianis) of T = Σ γᵢ kron(Aᵢ, Bᵢ), without forming T.

The rearrangement R(kron(A,B)) = vec(A)vec(B)ᵀ is a linear isometry, so the best kron(X, Y) ≈ T is the
top singular pair of R(T) = Σ γᵢ vec(Aᵢ)vec(Bᵢ)ᵀ = 𝒜ℬᵀ (rank ≤ N).  With Gram matrices
G_A = Γ[⟨Aᵢ,Aⱼ⟩]Γ, G_B = [⟨Bᵢ,Bⱼ⟩] and their square roots L, 𝒜 = Q_A L_A, ℬ = Q_B L_B, so
SVD(L_A L_B) = u σ vᵀ gives the singular pair exactly in coefficient space: X = √σ₁ Σ yᵢγᵢAᵢ,
Y = √σ₁ Σ zᵢBᵢ with y = L_A⁺u₁, z = L_B⁺v₁.  Y stays a sum of the inputs' low-rank w2 (factored), and
the kept energy σ₁²/‖T‖² is exact.  Y is then truncated to a rank by exact SVD; given X that truncation is
optimal, since ‖T − kron(X,Y')‖² = const + ‖X‖²‖Y − Y'‖².
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..lowrank import Factored, Quality, RankRule, inner, low_rank
from .terms import F64, KronParts

# eigenvalues of a Gram matrix below this fraction of the largest are round-off of exactly dependent inputs
GRAM_TOL = 1e-12


@dataclass(frozen=True)
class KronFit:
    """kron(w1, w2) with w2 = w2_up @ w2_down (factored) or w2_full; quality against T, after truncation."""

    w1: torch.Tensor
    w2_up: Optional[torch.Tensor]
    w2_down: Optional[torch.Tensor]
    w2_full: Optional[torch.Tensor]
    nearest_energy: float  # σ₁²/‖T‖² of the untruncated nearest Kronecker product
    quality: Quality

    @property
    def w2_rank(self) -> Optional[int]:
        return None if self.w2_down is None else self.w2_down.shape[0]


def _psd_sqrt(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^{1/2}, (G^{1/2})⁺) of a symmetric PSD matrix, eigenvalues below GRAM_TOL·λmax dropped."""
    lam, E = torch.linalg.eigh(G)
    keep = lam > GRAM_TOL * max(float(lam.max()), 0.0)
    E, root = E[:, keep], lam[keep].sqrt()
    return (E * root) @ E.T, (E / root) @ E.T


def _w2_gram(parts: Sequence[KronParts]) -> torch.Tensor:
    n = len(parts)
    G = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for j in range(i, n):
            G[i, j] = G[j, i] = inner(parts[i].w2, parts[j].w2)
    return G


def nearest_kron(gammas: Sequence[float], parts: Sequence[KronParts], w2_rank: Optional[int]) -> Optional[KronFit]:
    """Best kron(X, Y) for T = Σ γᵢ sᵢ kron(w1ᵢ, w2ᵢ) (sᵢ = parts' scales); Y truncated to `w2_rank`
    (None: Y written full).  None when T = 0."""
    g = torch.tensor([c * p.scale for c, p in zip(gammas, parts)], dtype=F64)
    A = torch.stack([p.w1.reshape(-1).to("cpu", F64) for p in parts], dim=1)  # (a·b) × N, tiny: on the CPU
    G_A = g[:, None] * (A.T @ A) * g[None, :]
    G_B = _w2_gram(parts)
    total = float((G_A * G_B).sum())
    if total <= 0.0:
        return None
    root_a, pinv_a = _psd_sqrt(G_A)
    root_b, pinv_b = _psd_sqrt(G_B)
    u, s, vh = torch.linalg.svd(root_a @ root_b)
    sigma = float(s[0])
    y = (pinv_a @ u[:, 0]) * g * math.sqrt(sigma)
    z = (pinv_b @ vh[0]) * math.sqrt(sigma)
    dtype = parts[0].w1.dtype
    X = (A @ y).reshape(parts[0].w1.shape).to(dtype)  # CPU
    Y = Factored(torch.cat([p.w2.U * float(zi) for p, zi in zip(parts, z)], dim=1),
                 torch.cat([p.w2.V for p in parts], dim=0))
    if w2_rank is None:
        Y_hat, up, down, full = Y, None, None, Y.dense()
    else:
        lr = low_rank(Y, RankRule(rank=w2_rank), solver="exact")
        Y_hat, up, down, full = lr.factored(), lr.up, lr.down, None
    return KronFit(X, up, down, full, sigma ** 2 / total, _quality(total, g, parts, X, Y_hat))


def _quality(total: float, g: torch.Tensor, parts: Sequence[KronParts], X: torch.Tensor,
             Y: Optional[Factored]) -> Quality:
    """Exact ‖T − kron(X,Y)‖/‖T‖ from ⟨T, kron(X,Y)⟩ = Σ γᵢsᵢ⟨w1ᵢ,X⟩⟨w2ᵢ,Y⟩ and ‖kron(X,Y)‖ = ‖X‖‖Y‖."""
    if Y is None:
        return Quality(1.0, 0.0)
    X64 = X.to(F64)
    cross = sum(float(gi) * float((p.w1.to("cpu", F64) * X64).sum()) * inner(p.w2, Y) for gi, p in zip(g, parts))
    approx = float(X64.square().sum()) * inner(Y, Y)
    rel = math.sqrt(max(0.0, total - 2.0 * cross + approx) / total)
    return Quality(rel, 1.0 - rel * rel)
