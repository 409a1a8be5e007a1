"""Randomized SVD (Halko, Martinsson, Tropp 2011), matrix-free: it only needs T@X and Tᵀ@Y.

Y = T Ω (Ω Gaussian N×(k+p), seeded);  q times: Q = qr(Y), Z = qr(TᵀQ), Y = T Z;
Q = qr(Y);  B = QᵀT = (TᵀQ)ᵀ;  SVD(B) = Ũ S Vh  =>  T ≈ (QŨ) S Vh.
"""
from __future__ import annotations

import torch

from .operators import Operator
from .svd_result import SVD

DEFAULT_OVERSAMPLE = 8
DEFAULT_POWER_ITERS = 2


def gaussian(rows: int, cols: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A seeded Gaussian matrix, drawn on the CPU so the same seed gives the same sketch on any device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def randomized_svd(
    op: Operator,
    k: int,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
) -> SVD:
    """Approximate top-(k+p) singular triplets of `op` (returns all computed, caller truncates).

    The sketch width is k + oversample, capped by min(out, N, inner rank): at the cap the range is
    captured whole and the result is exact.
    """
    out, n = op.shape
    width = max(1, min(k + oversample, out, n, op.inner_rank))
    omega = gaussian(n, width, seed, op.device, op.dtype)
    Q, _ = torch.linalg.qr(op.matmul(omega), mode="reduced")
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(op.rmatmul(Q), mode="reduced")
        Q, _ = torch.linalg.qr(op.matmul(Z), mode="reduced")
    Bt = op.rmatmul(Q)  # N×width = (QᵀT)ᵀ
    Vb, S, Ubh = torch.linalg.svd(Bt, full_matrices=False)  # Bt = Vb S Ubh  =>  B = Ubhᵀ S Vbᵀ
    return SVD(Q @ Ubh.T, S, Vb.T)
