"""The per-run knobs every method reads, and the per-module seed (same module, same seed -> same result)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

from ..lowrank import RankRule


@dataclass(frozen=True)
class MergeOptions:
    rule: RankRule
    solver: str
    seed: int = 0
    density: float = 0.5

    def seed_for(self, name: str) -> int:
        """A module's own seed: independent of which other modules the inputs hold."""
        return (self.seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)
