"""The per-run knobs every method reads, and the per-module seed (same module, same seed -> same result)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping, Optional

from ..lowrank import RankRule


@dataclass(frozen=True)
class MergeOptions:
    rule: RankRule
    solver: str
    seed: int = 0
    density: float = 0.5
    ranks: Optional[Mapping[str, int]] = None  # per-module fixed ranks (a size budget's allocation)

    def rule_for(self, name: str) -> RankRule:
        """The module's rank rule: its allocated rank when a budget set one, else the run's rule."""
        k = self.ranks.get(name) if self.ranks is not None else None
        return self.rule if not k else RankRule(rank=k, min_rank=1, max_rank=max(k, self.rule.max_rank))

    def seed_for(self, name: str) -> int:
        """A module's own seed: independent of which other modules the inputs hold."""
        return (self.seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)
