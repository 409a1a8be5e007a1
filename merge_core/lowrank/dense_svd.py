"""Reference path: full thin SVD of a dense matrix (kohya-style), for tests and benchmarks."""
from __future__ import annotations

import torch

from .operators import Operator
from .svd_result import SVD


def dense_svd(op: Operator) -> SVD:
    """torch.linalg.svd(full_matrices=False) of the densified operator, in fp32."""
    U, S, Vh = torch.linalg.svd(op.dense().to(torch.float32), full_matrices=False)
    return SVD(U, S, Vh)
