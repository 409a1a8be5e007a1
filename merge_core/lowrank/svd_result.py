"""The result type shared by every SVD path, and the even split of singular values into LoRA factors."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SVD:
    """T ≈ U diag(S) Vh, singular values descending; U (out×k), S (≥ k: an exact SVD keeps every value even
    when it forms only the top k vectors), Vh (k×N)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def truncate(self, k: int) -> "SVD":
        return SVD(self.U[:, :k], self.S[:k], self.Vh[:k])

    def split_factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """up = U_k √S_k (out×k), down = √S_k V_kᵀ (k×N); stored with α = k, so scale 1."""
        root = self.S[:k].clamp_min(0).sqrt()
        return self.U[:, :k] * root, root[:, None] * self.Vh[:k]
