"""Best rank-k factors of T = U V (inner rank R small) from its two R×R Gram matrices: the cheap exact core,
batched over modules of one shape so the R×R work costs a few calls per batch instead of dozens per module.

G_U = UᵀU, G_V = VVᵀ, after the exact gauge U·D, D⁻¹·V with D = (diag G_V / diag G_U)^¼ (balances every
rank-1 term);  G_U = FᵀF (Cholesky, or a truncated eigh root when G_U is singular, e.g. duplicated inputs);
M = F G_V Fᵀ = A Σ² Aᵀ holds T's singular values Σ, and U F⁺ A its left singular vectors.
up = U X with X = D F⁺ A_k Σ_k^½;  down = Y V with Y = (XᵀG_U X)⁻¹ XᵀG_U, the least-squares best down
for that up.  Quality is exact from the same Grams:
‖T‖² = Σ G_U⊙G_V,  ⟨T, UXYV⟩ = Σ (G_U X)⊙(G_V Yᵀ),  ‖UXYV‖² = Σ (XᵀG_U X)⊙(Y G_V Yᵀ).

Cost: Gram blocks O((out+N)R²) and the factor products O((out+N)Rk), all GEMMs on the inputs' own blocks
(no stacked copy), and R×R work batched over the modules (roots and solves in fp64, the eigenproblem of M in
fp32) — several times cheaper than Householder QR of both factors (the QR-core path) and than a sketch with
power iterations once R ≤ 2(k+p).  The Grams are fp32 products, so singular values below ~1e-3·σ₁ carry
their round-off; the kept ones and the reported quality are unaffected at usual energies.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..lowrank import Factored, LowRank, Quality, RankRule
from ..lowrank.rank_select import choose_rank

F64 = torch.float64
ROOT_TOL = 1e-7  # relative size below which a direction of G_U is fp32 round-off (left out of its root)


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


def _grams(blocks: Sequence[torch.Tensor], transpose: bool, R: int, device: torch.device) -> torch.Tensor:
    """R×R Gram of the side-by-side blocks (UᵀU for up factors, V Vᵀ for down factors), one GEMM per pair."""
    g = torch.empty(R, R, device=device)
    offsets = [0]
    for b in blocks:
        offsets.append(offsets[-1] + (b.shape[0] if transpose else b.shape[1]))
    for i, a in enumerate(blocks):
        for j in range(i, len(blocks)):
            b = blocks[j]
            gij = a @ b.T if transpose else a.T @ b
            g[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]] = gij
            if j != i:
                g[offsets[j]:offsets[j + 1], offsets[i]:offsets[i + 1]] = gij.T
    return g


def _apply(blocks: Sequence[torch.Tensor], coeffs: torch.Tensor, left: bool) -> torch.Tensor:
    """[U₁ … Uₙ] @ X (left) or Y @ [V₁; …; Vₙ] as a sum of block products (no stacked copy)."""
    out, at = None, 0
    for b in blocks:
        r = b.shape[1] if left else b.shape[0]
        part = b @ coeffs[at:at + r] if left else coeffs[:, at:at + r] @ b
        out = part if out is None else out.add_(part)
        at += r
    return out


def gram_low_rank_batch(ups: Sequence[Sequence[torch.Tensor]], downs: Sequence[Sequence[torch.Tensor]],
                        col_scale: torch.Tensor, rule: RankRule) -> list[LowRank]:
    """Best rank-k factors of each T_b = [U_b1 … U_bn] diag(c_b) [V_b1; …; V_bn] (one shape for the batch;
    U/V blocks fp32 on one device, c: batch × R), k from `rule`.  c is folded into the small matrices."""
    first_u, first_v = ups[0][0], downs[0][0]
    shape, R, device = (first_u.shape[0], first_v.shape[1]), col_scale.shape[1], first_u.device
    gu = torch.stack([_grams(us, False, R, device) for us in ups]).to(F64)
    gv = torch.stack([_grams(vs, True, R, device) for vs in downs]).to(F64)
    c = col_scale.to(device=device, dtype=F64)
    gu = gu * (c[:, :, None] * c[:, None, :])
    totals = (gu * gv).sum((-2, -1))
    d = _balance(gu, gv)
    dd = d[:, :, None] * d[:, None, :]
    F, F_pinv = _roots(gu * dd)
    M = F @ (gv / dd) @ F.mT
    lam, A = torch.linalg.eigh(((M + M.mT) / 2).float())  # fp32: as accurate as the fp32 Grams behind M
    S, A = lam.to(F64).flip(-1).clamp_min(0.0).sqrt(), A.to(F64).flip(-1)
    totals_list, S_cpu = totals.tolist(), S.cpu()
    ks = [choose_rank(S_cpu[b], totals_list[b], rule, shape) for b in range(len(totals_list))]
    kmax = max(ks)
    kept = torch.arange(kmax, device=device)[None, :] < torch.as_tensor(ks, device=device)[:, None]
    X = d[:, :, None] * (F_pinv @ (A[:, :, :kmax] * (S[:, :kmax].sqrt() * kept)[:, None, :]))
    gx = gu @ X
    xgx = X.mT @ gx
    Y = torch.linalg.solve(xgx + torch.diag_embed((~kept).to(F64)), gx.mT)  # identity on unused columns
    gvy = gv @ Y.mT
    inner = (gx * gvy).sum((-2, -1)).tolist()
    approx2 = (xgx * (Y @ gvy)).sum((-2, -1)).tolist()
    X, Y = (c[:, :, None] * X).float(), Y.float()  # up = [U] diag(c) X
    out = []
    for b, k in enumerate(ks):
        total = totals_list[b]
        if k == 0:
            out.append(LowRank(None, None, 0, Quality(0.0, 1.0) if total <= 0 else Quality(1.0, 0.0), S[b].float()))
            continue
        rel = math.sqrt(max(0.0, total - 2.0 * inner[b] + approx2[b]) / total)
        up, down = _apply(ups[b], X[b, :, :k], True), _apply(downs[b], Y[b, :k], False)
        out.append(LowRank(up, down, k, Quality(rel, 1.0 - rel * rel), S[b].float()))
    return out


def gram_low_rank(op: Factored, rule: RankRule) -> LowRank:
    """The Gram core for one factored operator."""
    ones = torch.ones(1, op.inner_rank, dtype=F64, device=op.device)
    return gram_low_rank_batch([[op.U]], [[op.V]], ones, rule)[0]
