"""Best rank-k factors of T = U V (inner rank R small) from its two R×R Gram matrices: the cheap exact core.

G_U = UᵀU, G_V = VVᵀ, after the exact gauge U·D, D⁻¹·V with D = (diag G_V / diag G_U)^¼ (balances every
rank-1 term);  G_U = FᵀF (Cholesky, or a truncated eigh root when G_U is singular, e.g. duplicated inputs);
M = F G_V Fᵀ = A Σ² Aᵀ holds T's singular values Σ, and U F⁻¹ A its left singular vectors.
up = U X with X = D F⁻¹ A_k Σ_k^½;  down = Y V with Y = (XᵀG_U X)⁻¹ XᵀG_U, the least-squares best down
for that up.  Quality is exact from the same Grams:
‖T‖² = Σ G_U⊙G_V,  ⟨T, UXYV⟩ = Σ (G_U X)⊙(G_V Yᵀ),  ‖UXYV‖² = Σ (XᵀG_U X)⊙(Y G_V Yᵀ).

Cost: two GEMM-speed Gram products O((out+N)R²), two O((out+N)Rk) products for the factors and R×R
problems in fp64 — several times cheaper than Householder QR of both factors (the QR-core path) and than a
sketch with power iterations once R ≤ 2(k+p).  The Grams are fp32 products, so singular values below
~1e-3·σ₁ carry their round-off; the kept ones and the reported quality are unaffected at usual energies.
"""
from __future__ import annotations

import math

import torch

from ..lowrank import Factored, LowRank, Quality, RankRule, choose_rank

F64 = torch.float64
ROOT_TOL = 1e-7  # relative size below which a direction of G_U is fp32 round-off (left out of its root)


def _balance(gu: torch.Tensor, gv: torch.Tensor) -> torch.Tensor:
    """D = (‖vᵢ‖/‖uᵢ‖)^½ per rank-1 term (1 where a column or row is zero)."""
    du, dv = gu.diagonal(), gv.diagonal()
    ok = (du > 0) & (dv > 0)
    return torch.where(ok, (dv / torch.where(ok, du, 1.0)) ** 0.25, torch.ones_like(du))


def _root(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, F⁺) with FᵀF = g: the Cholesky factor when g is well inside the PSD cone, else eigh's root."""
    L, info = torch.linalg.cholesky_ex(g)
    scale = float(g.diagonal().max())
    if int(info) == 0 and float(L.diagonal().min()) ** 2 > ROOT_TOL * scale:
        F = L.T
        return F, torch.linalg.solve_triangular(F, torch.eye(F.shape[0], dtype=F.dtype, device=F.device), upper=True)
    lam, E = torch.linalg.eigh(g)
    keep = lam > ROOT_TOL * max(float(lam[-1]), 0.0)
    root = lam[keep].sqrt()
    return root[:, None] * E[:, keep].T, E[:, keep] / root


def _quality(total: float, inner: float, approx2: float) -> Quality:
    rel = math.sqrt(max(0.0, total - 2.0 * inner + approx2) / total)
    return Quality(rel, 1.0 - rel * rel)


def gram_low_rank(op: Factored, rule: RankRule) -> LowRank:
    """Best rank-k factors of `op` (k from `rule` on the exact ‖T‖²) with their exact quality."""
    U, V = op.U, op.V
    gu, gv = (U.T @ U).to(F64), (V @ V.T).to(F64)
    total = float((gu * gv).sum())
    if total <= 0.0:
        return LowRank(None, None, 0, Quality(0.0, 1.0), torch.zeros(0, dtype=U.dtype, device=U.device))
    d = _balance(gu, gv)
    dd = d[:, None] * d[None, :]
    F, F_pinv = _root(gu * dd)
    M = F @ (gv / dd) @ F.T
    lam, A = torch.linalg.eigh((M + M.T) / 2)
    S = lam.flip(0).clamp_min(0.0).sqrt()
    A = A.flip(1)
    k = choose_rank(S, total, rule, op.shape)
    if k == 0:
        return LowRank(None, None, 0, Quality(1.0, 0.0), S.to(U.dtype))
    X = d[:, None] * (F_pinv @ (A[:, :k] * S[:k].sqrt()))
    gx = gu @ X
    Y = torch.linalg.solve(X.T @ gx, gx.T)
    up, down = U @ X.to(U.dtype), Y.to(V.dtype) @ V
    quality = _quality(total, float((gx * (gv @ Y.T)).sum()), float(((X.T @ gx) * (Y @ gv @ Y.T)).sum()))
    return LowRank(up, down, k, quality, S.to(U.dtype))
