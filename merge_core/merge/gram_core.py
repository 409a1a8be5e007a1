"""Best rank-k factors of T = U V (inner rank R small) from its two R×R Gram matrices: the cheap exact core,
batched over modules of one shape so the R×R work costs a few calls per batch instead of dozens per module.

G_U = UᵀU, G_V = VVᵀ, after the exact gauge U·D, D⁻¹·V with D = (diag G_V / diag G_U)^¼ (balances every
rank-1 term);  G_U = FᵀF (Cholesky, or a truncated eigh root when G_U is singular, e.g. duplicated inputs);
M = F G_V Fᵀ = A Σ² Aᵀ holds T's singular values Σ, and U F⁺ A its left singular vectors.
up = U X with X = D F⁺ A_k Σ_k^½;  down = Y V with Y = (XᵀG_U X)⁻¹ XᵀG_U, the least-squares best down
for that up.  Quality is exact from the same Grams:
‖T‖² = Σ G_U⊙G_V,  ⟨T, UXYV⟩ = Σ (G_U X)⊙(G_V Yᵀ),  ‖UXYV‖² = Σ (XᵀG_U X)⊙(Y G_V Yᵀ).

Cost: two GEMM-speed Gram products O((out+N)R²), two O((out+N)Rk) products for the factors and R×R
problems in fp64 — several times cheaper than Householder QR of both factors (the QR-core path) and than a
sketch with power iterations once R ≤ 2(k+p).  The Grams are fp32 products, so singular values below
~1e-3·σ₁ carry their round-off; the kept ones and the reported quality are unaffected at usual energies.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..lowrank import Factored, LowRank, Quality, RankRule
from ..lowrank.rank_select import NULL_TOL

F64 = torch.float64
ROOT_TOL = 1e-7  # relative size below which a direction of G_U is fp32 round-off (left out of its root)


def choose_ranks(S: np.ndarray, totals: np.ndarray, rule: RankRule, shape: tuple[int, int]) -> np.ndarray:
    """merge_core.lowrank.choose_rank for a batch: S (batch × m, descending), totals = ‖T‖² per row."""
    s0 = S[:, :1]
    available = np.where(s0[:, 0] > 0, (S > s0 * NULL_TOL).sum(1), 0)
    if rule.rank is not None:
        k = np.full(len(S), rule.rank)
    elif rule.energy >= 1.0:
        k = np.clip(available, rule.min_rank, rule.max_rank)
    else:
        kept = np.where(np.arange(S.shape[1]) < available[:, None], S.astype(np.float64) ** 2, 0.0)
        reached = np.cumsum(kept, 1) >= rule.energy * np.maximum(totals, np.finfo(np.float64).tiny)[:, None]
        energy_rank = np.where(reached.any(1), reached.argmax(1) + 1, available)
        k = np.clip(energy_rank, rule.min_rank, rule.max_rank)
    k = np.maximum(1, np.minimum(np.minimum(k, min(shape)), available))
    return np.where((available == 0) | (totals <= 0), 0, k)


def _balance(gu: torch.Tensor, gv: torch.Tensor) -> torch.Tensor:
    """D = (‖vᵢ‖/‖uᵢ‖)^½ per rank-1 term (1 where a column or row is zero); batch × R."""
    du, dv = gu.diagonal(dim1=-2, dim2=-1), gv.diagonal(dim1=-2, dim2=-1)
    ok = (du > 0) & (dv > 0)
    return torch.where(ok, (dv / torch.where(ok, du, 1.0)) ** 0.25, torch.ones_like(du))


def _eigh_root(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, F⁺), R×R, FᵀF = g on the directions above round-off (zero rows/columns for the others)."""
    lam, E = torch.linalg.eigh(g)
    keep = (lam > ROOT_TOL * max(float(lam[-1]), 0.0)).to(g.dtype)
    root = lam.clamp_min(0).sqrt()
    F = (root * keep)[:, None] * E.T
    F_pinv = E * (keep / torch.where(keep > 0, root, 1.0))
    return F, F_pinv


def _roots(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched (F, F⁺) with FᵀF = g: Cholesky where g is well inside the PSD cone, eigh's root elsewhere."""
    L, info = torch.linalg.cholesky_ex(g)
    diag = L.diagonal(dim1=-2, dim2=-1)
    ok = (info == 0) & (diag.amin(-1) ** 2 > ROOT_TOL * g.diagonal(dim1=-2, dim2=-1).amax(-1))
    F = L.mT.contiguous()
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device).expand_as(g)
    F_pinv = torch.linalg.solve_triangular(torch.where(ok[:, None, None], F, eye), eye, upper=True)
    for i in torch.nonzero(~ok).flatten().tolist():
        F[i], F_pinv[i] = _eigh_root(g[i])
    return F, F_pinv


def gram_low_rank_batch(U: torch.Tensor, V: torch.Tensor, rule: RankRule,
                        col_scale: Optional[torch.Tensor] = None) -> list[LowRank]:
    """Best rank-k factors of each T_b = U_b diag(c_b) V_b (U: batch × out × R, V: batch × R × N, c: batch × R,
    default 1), k from `rule`.  The column scales are folded into the small matrices, never into U."""
    shape = (U.shape[1], V.shape[2])
    gu, gv = (U.mT @ U).to(F64), (V @ V.mT).to(F64)
    if col_scale is not None:
        c = col_scale.to(F64)
        gu = gu * (c[:, :, None] * c[:, None, :])
    totals = (gu * gv).sum((-2, -1))
    d = _balance(gu, gv)
    dd = d[:, :, None] * d[:, None, :]
    F, F_pinv = _roots(gu * dd)
    M = F @ (gv / dd) @ F.mT
    lam, A = torch.linalg.eigh((M + M.mT) / 2)
    S, A = lam.flip(-1).clamp_min(0.0).sqrt(), A.flip(-1)
    totals_np = totals.cpu().numpy()
    ks = choose_ranks(S.cpu().numpy(), totals_np, rule, shape)
    kmax = int(ks.max()) if len(ks) else 0
    kept = torch.arange(kmax, device=U.device)[None, :] < torch.as_tensor(ks, device=U.device)[:, None]
    X = d[:, :, None] * (F_pinv @ (A[:, :, :kmax] * (S[:, :kmax].sqrt() * kept)[:, None, :]))
    gx = gu @ X
    gram_x = X.mT @ gx + torch.diag_embed((~kept).to(F64))  # identity on unused columns keeps it invertible
    Y = torch.linalg.solve(gram_x, gx.mT)
    inner = (gx * (gv @ Y.mT)).sum((-2, -1)).tolist()
    approx2 = ((X.mT @ gx) * (Y @ gv @ Y.mT)).sum((-2, -1)).tolist()
    if col_scale is not None:
        X = c[:, :, None] * X  # up = U diag(c) X
    X, Y = X.to(U.dtype), Y.to(V.dtype)
    out = []
    for b, k in enumerate(ks.tolist()):
        total = float(totals_np[b])
        if k == 0:
            out.append(LowRank(None, None, 0, Quality(0.0, 1.0) if total <= 0 else Quality(1.0, 0.0),
                               S[b].to(U.dtype)))
            continue
        rel = math.sqrt(max(0.0, total - 2.0 * inner[b] + approx2[b]) / total)
        out.append(LowRank(U[b] @ X[b, :, :k], Y[b, :k] @ V[b], k, Quality(rel, 1.0 - rel * rel), S[b].to(U.dtype)))
    return out


def gram_low_rank(op: Factored, rule: RankRule) -> LowRank:
    """The Gram core for one factored operator."""
    return gram_low_rank_batch(op.U[None], op.V[None], rule)[0]
