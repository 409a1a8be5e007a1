"""Exact SVD of a factored T = U V without forming it: QR of both factors, SVD of the R×R core.

U = Q_U R_U, Vᵀ = Q_V R_V  =>  T = Q_U (R_U R_Vᵀ) Q_Vᵀ;  SVD(R_U R_Vᵀ) = A S Bᵀ  =>  T = (Q_U A) S (Q_V B)ᵀ.
Cost O((out+N)R²); the core SVD runs in fp64 on the CPU whatever the device (it is R×R: a GPU solver takes
milliseconds per call on matrices this small).  Only the top `keep` singular vectors are formed
(all R singular values are returned: they give ‖T‖² = Σσᵢ² and every truncation's exact error).
"""
from __future__ import annotations

from typing import Optional

import torch

from .operators import Factored
from .svd_result import SVD


def factored_svd(op: Factored, keep: Optional[int] = None) -> SVD:
    """All min(out, N, R) singular values of U V, exact up to fp32 round-off, with the top `keep` (default all)
    singular vectors."""
    Qu, Ru = torch.linalg.qr(op.U, mode="reduced")
    Qv, Rv = torch.linalg.qr(op.V.T, mode="reduced")
    core = Ru.to("cpu", torch.float64) @ Rv.to("cpu", torch.float64).T
    A, S, Bh = torch.linalg.svd(core, full_matrices=False)
    A, Bh = A[:, :keep], Bh[:keep]
    to = dict(device=op.device, dtype=op.U.dtype)
    return SVD(Qu @ A.to(**to), S.to(**to), (Qv @ Bh.T.to(**to)).T)
