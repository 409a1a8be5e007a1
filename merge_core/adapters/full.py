"""Full diffs: ΔW stored whole (`.diff`), and/or a bias delta (`.diff_b`); LyCORIS `w_norm`/`b_norm` read as these."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Dense, Extras, f32


@dataclass
class FullDiff(Extras):
    diff: Optional[torch.Tensor] = None

    kind = "full"

    @classmethod
    def from_roles(cls, roles: dict[str, torch.Tensor]) -> "FullDiff":
        return cls(roles.get("diff"), **cls.extras_from(roles))

    @property
    def rank(self) -> int:
        return min(self.matrix_shape) if self.diff is not None and self.diff.ndim >= 2 else 0

    @property
    def native_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape) if self.diff is not None else ()

    @property
    def has_weight(self) -> bool:
        return self.diff is not None

    def operator(self, device: Optional[torch.device] = None) -> Dense:
        """The weight delta as a matrix (a 1-D diff, e.g. a norm weight, is one column)."""
        d = f32(self.diff, device)
        return Dense(d.reshape(-1, 1) if d.ndim == 1 else d.flatten(1))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"diff": self.diff} if self.diff is not None else {}
        return {**out, **self.extra_tensors()}
