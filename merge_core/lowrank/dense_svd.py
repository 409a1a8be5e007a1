"""Reference path: full thin SVD of a dense matrix (kohya-style), for tests and benchmarks."""
from __future__ import annotations

import torch

from .operators import Operator
from .svd_result import SVD

EPS32 = torch.finfo(torch.float32).eps


def dense_svd(op: Operator) -> SVD:
    """torch.linalg.svd(full_matrices=False) of the densified operator, in fp32; σ ≤ max(m, n)·ε₃₂·σ₁ (the
    SVD's own round-off, numpy's matrix_rank tolerance) set to 0, so a fixed rank above T's keeps no noise."""
    A = op.dense().to(torch.float32)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if S.numel():
        S = torch.where(S > max(A.shape) * EPS32 * S[0], S, torch.zeros_like(S))
    return SVD(U, S, Vh)
