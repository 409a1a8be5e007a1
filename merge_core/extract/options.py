"""The knobs of an extraction and the rank rules they imply.

Rank: a fixed `rank` (default 32, the original extractor's), or the energy rule of merge_core.lowrank.RankRule.
Conv layers with a kernel larger than 1×1 (LoCon) use `conv_rank`: the fixed rank under a fixed rule, the
max rank under the energy rule; None = the same rule as linear layers.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

from ..errors import MergeCoreError
from ..lowrank.rank_select import RankRule

DEFAULT_RANK = 32
OVERSAMPLE = 8
POWER_ITERS = 2


@dataclass(frozen=True)
class ExtractOptions:
    rule: RankRule = RankRule(rank=DEFAULT_RANK)
    conv_rank: Optional[int] = None
    diff_only: bool = False
    min_diff: float = 0.0
    text_encoders: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.conv_rank is not None and self.conv_rank < 1:
            raise MergeCoreError(f"conv rank must be >= 1, got {self.conv_rank}")
        if self.min_diff < 0:
            raise MergeCoreError(f"min-diff must be >= 0, got {self.min_diff}")

    @property
    def conv_rule(self) -> RankRule:
        r, c = self.rule, self.conv_rank
        if c is None:
            return r
        if r.rank is not None:
            return RankRule(rank=c)
        return RankRule(None, r.energy, min(r.min_rank, c), c)

    def rule_for(self, weight_shape: tuple[int, ...]) -> RankRule:
        """The rule of a weight of this shape (LoCon kernels: conv_rule)."""
        kernel = 1
        for d in weight_shape[2:]:
            kernel *= d
        return self.conv_rule if kernel > 1 else self.rule

    def seed_for(self, name: str) -> int:
        """A sketch seed per module, fixed by the run's seed and the module name (not by the order)."""
        return (self.seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2 ** 62)

    def describe(self) -> dict:
        return {**self.rule.describe(), "conv_rank": self.conv_rank, "diff_only": self.diff_only,
                "min_diff": self.min_diff, "text_encoders": self.text_encoders, "seed": self.seed,
                "solver": "rsvd", "oversample": OVERSAMPLE, "power_iters": POWER_ITERS}
