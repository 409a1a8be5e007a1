"""Best rank-k factors of T = U V (inner rank R small) from its two R×R Gram matrices: the cheap exact core,
batched over modules of one shape so the R×R work costs a few calls per batch instead of dozens per module.

G_U = UᵀU, G_V = VVᵀ, after the exact gauge U·D, D⁻¹·V with D = (diag G_V / diag G_U)^¼ (balances every
rank-1 term);  G_U = FᵀF (Cholesky, or a truncated eigh root when G_U is singular, e.g. duplicated inputs),
so Q = U F⁻¹ has orthonormal columns and T = Q (F V);  M = F G_V Fᵀ = A Σ² Aᵀ holds T's singular values Σ,
and Q A its left singular vectors.
up = U X with X = D F⁻¹ A_k Σ_k^½;  down = Y V with Y = Σ_k^-½ A_kᵀ F D⁻¹, so up·down = Q A_k A_kᵀ Qᵀ T, the
truncated SVD, and every rank-1 term has ‖up column‖ = ‖down row‖ = σ^½.  Its error is exact from the same
numbers:  ‖T − up·down‖² = Σ_{i>k} σᵢ² + (‖T‖² − tr M),  ‖T‖² = Σ G_U⊙G_V  (the second term is the part of T
in directions a singular G_U's root left out, zero to round-off otherwise).

Cost: the Grams O((out+N)R²) and the factor products O((out+N)Rk), GEMMs on one module's factors at a time,
cast into a scratch matrix twice (once per pass) so they stay in cache instead of a batch of them crossing
memory three times; the R×R work batched over the modules (the roots in fp64, M and its eigenproblem in the
work dtype, then one triangular solve and one product) on the CPU whatever the device (a GPU's solvers take
milliseconds per call on matrices this small: on an H100 an SDXL merge's 34 batched 64×64 eighs took 0.76 s,
22 ms each, of its 2.9 s) — several times cheaper than Householder QR of both factors (the QR-core path)
and than a sketch with power iterations up to R ≈ 8(k+p) on a CPU (merge's gram_core_limit).  Work dtype
fp32 (the merges): singular values below ~1e-3·σ₁ carry the Grams' round-off; the kept ones and the reported
quality are unaffected at usual energies.  fp64 (fuse's exact lora form): ~1e-8·σ₁, at twice the GEMM cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .decompose import LowRank, finite
from .operators import Factored, balancing_gauge
from .quality import Quality
from .rank_select import RankRule, choose_ranks

F64 = torch.float64
# relative size below which a direction of G_U is round-off of Grams formed in that dtype (left out of its root)
ROOT_TOL = {torch.float32: 1e-7, F64: 1e-14}


def _eigh_root(g: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, F⁺), R×R, FᵀF = g on the directions above tol·λ_max (zero rows/columns for the others)."""
    lam, E = torch.linalg.eigh(g)
    keep = (lam > tol * max(float(lam[-1]), 0.0)).to(g.dtype)
    root = lam.clamp_min(0).sqrt()
    F = (root * keep)[:, None] * E.T
    F_pinv = E * (keep / torch.where(keep > 0, root, 1.0))
    return F, F_pinv


def _roots(g: torch.Tensor, tol: float) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Batched F with FᵀF = g: the upper-triangular Cholesky factor where g is well inside the PSD cone (its
    smallest pivot above tol), and eigh's root elsewhere — those modules' pseudo-inverses F⁺ by batch index."""
    L, info = torch.linalg.cholesky_ex(g)
    diag = L.diagonal(dim1=-2, dim2=-1)
    ok = (info == 0) & (diag.amin(-1) ** 2 > tol * g.diagonal(dim1=-2, dim2=-1).amax(-1))
    F = L.mT.contiguous()
    pinv = {}
    for i in torch.nonzero(~ok).flatten().tolist():
        F[i], pinv[i] = _eigh_root(g[i], tol)
    return F, pinv


def _left_solve(F: torch.Tensor, pinv: dict[int, torch.Tensor], rhs: torch.Tensor) -> torch.Tensor:
    """F⁻¹·rhs per module (F upper triangular), F⁺·rhs for the modules in `pinv`."""
    if pinv:
        eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
        F = F.clone()
        for i in pinv:
            F[i] = eye
    X = torch.linalg.solve_triangular(F, rhs, upper=True)
    for i, P in pinv.items():
        X[i] = P @ rhs[i]
    return X


@dataclass
class Stacked:
    """The factors of a batch of same-shape modules, T_b = U_b diag(c_b) V_b with U_b = [U_b1 … U_bn] (out × R)
    and V_b = [V_b1; …; V_bn] (R × N): `ups[b]`/`downs[b]` hold the inputs' blocks in any dtype, and
    `u(b, into)`/`v(b, into)` put them side by side in fp32 in a scratch matrix, when they are needed — so a
    module's factors stay in cache from the cast to the products, and only one module is in fp32 at a time."""

    ups: Sequence[Sequence[torch.Tensor]]
    downs: Sequence[Sequence[torch.Tensor]]
    col_scale: torch.Tensor  # batch × R, the scale of each column of U_b (used on the CPU, with the R×R work)

    @classmethod
    def of(cls, op: Factored) -> "Stacked":
        """One factored operator as a batch of one, its scale already in U."""
        return cls([[op.U]], [[op.V]], torch.ones(1, op.inner_rank, dtype=F64))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(out, N, R)."""
        return self.ups[0][0].shape[0], self.downs[0][0].shape[1], self.col_scale.shape[1]

    def u(self, b: int, into: torch.Tensor) -> torch.Tensor:
        return _joined(self.ups[b], into, 1)

    def v(self, b: int, into: torch.Tensor) -> torch.Tensor:
        return _joined(self.downs[b], into, 0)


def _joined(blocks: Sequence[torch.Tensor], into: torch.Tensor, dim: int) -> torch.Tensor:
    """The blocks side by side along `dim`, copied (and cast) into `into`; a lone block of into's dtype as is.
    Columns (dim 1) of one dtype are joined in it first and cast in one contiguous pass: casting each block
    into a strided slice of `into` runs 1.3–1.6× slower.  Blocks of mixed dtypes (an fp8 file with an fp16
    one: torch promotes fp8 with nothing) are cast block by block."""
    if len(blocks) == 1 and blocks[0].dtype == into.dtype:
        return blocks[0]
    if dim == 1 and len(blocks) > 1 and len({b.dtype for b in blocks}) == 1:
        return into.copy_(torch.cat(list(blocks), 1))
    at = 0
    for block in blocks:
        into.narrow(dim, at, block.shape[dim]).copy_(block)
        at += block.shape[dim]
    return into


@dataclass
class GramCore:
    """A batch's spectra and what its factors are made from: pass 1 (the Grams) and the R×R work."""

    S: torch.Tensor  # batch × R singular values, descending (fp64; this and the R×R fields below on the CPU)
    totals: list[float]  # ‖T_b‖²
    A: torch.Tensor  # eigenvectors of M, ascending
    F: torch.Tensor  # the roots of the balanced G_U
    pinv: dict[int, torch.Tensor]  # F⁺ of the modules whose root is eigh's
    d: torch.Tensor  # the balancing gauge
    c: torch.Tensor  # the column scales
    left_out: torch.Tensor  # ‖T‖² − tr M
    dtype: torch.dtype  # of the Grams, M's eigenproblem and the factor products


def gram_core(factors: Stacked, dtype: torch.dtype = torch.float32) -> GramCore:
    """Pass 1 over a batch (one shape and device): the Grams, each module cast once into a scratch matrix of
    `dtype` (the work dtype, see above); then the batched R×R work up to the singular values (c folded into the
    small matrices)."""
    out, n, R = factors.shape
    B, device, col_scale = len(factors.ups), factors.ups[0][0].device, factors.col_scale
    work = dict(dtype=dtype, device=device)
    su, sv = torch.empty(out, R, **work), torch.empty(R, n, **work)
    gu, gv = torch.empty(B, R, R, **work), torch.empty(B, R, R, **work)
    for b in range(B):
        U, V = factors.u(b, su), factors.v(b, sv)
        torch.mm(U.T, U, out=gu[b])
        torch.mm(V, V.T, out=gv[b])
    gu, gv = gu.to("cpu", F64), gv.to("cpu", F64)  # the R×R work on the CPU (see above)
    c = col_scale.to("cpu", F64)
    gu = gu * (c[:, :, None] * c[:, None, :])
    totals = (gu * gv).sum((-2, -1))
    listed = [finite(t) for t in totals.tolist()]  # before any factorisation of NaN/inf
    d = balancing_gauge(gu.diagonal(dim1=-2, dim2=-1), gv.diagonal(dim1=-2, dim2=-1))
    dd = d[:, :, None] * d[:, None, :]
    F, pinv = _roots(gu * dd, ROOT_TOL[dtype])
    gv_d = gv / dd
    # eigh reads M's lower triangle; in the Grams' dtype, as accurate as they are
    lam, A = torch.linalg.eigh(F.to(dtype) @ gv_d.to(dtype) @ F.mT.to(dtype))
    S = lam.to(F64).flip(-1).clamp_min(0.0).sqrt()
    left_out = torch.zeros_like(totals)  # ‖T‖² − tr M: zero to round-off where the root is a Cholesky factor
    for i in pinv:
        left_out[i] = (totals[i] - (F[i] @ gv_d[i] * F[i]).sum()).clamp_min(0.0)
    return GramCore(S, listed, A, F, pinv, d, c, left_out, dtype)


def gram_factors(core: GramCore, factors: Stacked, rules: Sequence[RankRule]) -> list[LowRank]:
    """The best rank-k factors of each module of the batch from its core, k from its rule (rules[b]); pass 2
    casts each module again into a scratch matrix."""
    out, n, R = factors.shape
    S, totals, A, F, d, c = core.S, core.totals, core.A, core.F, core.d, core.c  # on the CPU
    device = factors.ups[0][0].device
    ks = (choose_ranks(S, totals, rules[0], (out, n)) if all(r == rules[0] for r in rules)
          else [choose_ranks(S[b:b + 1], totals[b:b + 1], r, (out, n))[0] for b, r in enumerate(rules)])
    kmax = max(ks)
    kept = torch.arange(S.shape[1])[None, :] < torch.as_tensor(ks)[:, None]
    tail = (S * S * ~kept).sum(-1)
    kept, Ak = kept[:, :kmax], A[:, :, A.shape[-1] - kmax:].flip(-1).to(F64)
    half = S[:, :kmax].sqrt() * kept  # σ^½ on the kept columns (σ > 0 there: choose_ranks keeps no null ones)
    X = d[:, :, None] * _left_solve(F, core.pinv, Ak * half[:, None, :])
    Y = (torch.where(kept, 1.0 / torch.where(kept, half, 1.0), 0.0)[:, :, None] * (Ak.mT @ F)) / d[:, None, :]
    errors = (tail + core.left_out).tolist()
    X, Y = (c[:, :, None] * X).to(device, core.dtype), Y.to(device, core.dtype)  # up = U diag(c) X, down = Y V
    work = dict(dtype=core.dtype, device=device)
    su, sv = torch.empty(out, R, **work), torch.empty(R, n, **work)
    results = []
    for b, k in enumerate(ks):
        total = totals[b]
        if k == 0:
            results.append(LowRank.zero(total, S[b].float()))
            continue
        rel = math.sqrt(min(1.0, errors[b] / total))
        up, down = factors.u(b, su) @ X[b, :, :k], Y[b, :k] @ factors.v(b, sv)  # fresh, exactly k wide
        up, down = up.float(), down.float()  # no-ops for fp32
        results.append(LowRank(up, down, k, Quality(rel, 1.0 - rel * rel), S[b].float()))
    return results


def gram_low_rank_batch(factors: Stacked, rules: Sequence[RankRule],
                        dtype: torch.dtype = torch.float32) -> list[LowRank]:
    """Best rank-k factors of each T_b = U_b diag(c_b) V_b of `factors`, k from rules[b] (dtype: gram_core's)."""
    return gram_factors(gram_core(factors, dtype), factors, rules)


def gram_low_rank(op: Factored, rule: RankRule, dtype: torch.dtype = torch.float32) -> LowRank:
    """The Gram core for one factored operator."""
    return gram_low_rank_batch(Stacked.of(op), [rule], dtype)[0]
