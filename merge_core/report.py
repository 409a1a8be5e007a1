"""The per-module report every operation returns: rank, params, exact error and kept energy, with totals.

JSON form: {"modules": [{name, kind, rank, params, rel_error, energy_kept, note}], "total_params",
"avg_rank", "seconds", ...extra}.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

# progress(done, total, module_name); may raise to cancel (the nodes pass ComfyUI's interrupt check)
Progress = Optional[Callable[[int, int, str], None]]


@dataclass
class ModuleReport:
    name: str
    kind: str
    rank: int
    params: int
    rel_error: float
    energy_kept: float
    note: str = ""


@dataclass
class Report:
    operation: str
    modules: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def add(self, row: ModuleReport) -> None:
        self.modules.append(row)

    @property
    def total_params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def avg_rank(self) -> float:
        ranked = [m.rank for m in self.modules if m.rank > 0]
        return sum(ranked) / len(ranked) if ranked else 0.0

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules if math.isfinite(m.rel_error)), default=0.0)

    def as_dict(self) -> dict:
        return {"operation": self.operation, "modules": [asdict(m) for m in self.modules],
                "total_params": self.total_params, "avg_rank": self.avg_rank, "seconds": self.seconds,
                "max_rel_error": self.max_rel_error, **self.extra}

    def table(self, limit: Optional[int] = 20) -> str:
        """A text table: the worst modules by error first, then totals."""
        rows = sorted(self.modules, key=lambda m: -m.rel_error)
        shown = rows if limit is None else rows[:limit]
        width = max([len(m.name) for m in shown] + [6])
        lines = [f"{'module':<{width}}  {'kind':<5} {'rank':>5} {'params':>10} {'rel_err':>9} {'energy':>8}"]
        for m in shown:
            lines.append(f"{m.name:<{width}}  {m.kind:<5} {m.rank:>5} {m.params:>10,} {m.rel_error:>9.2e} "
                         f"{m.energy_kept:>8.5f}" + (f"  {m.note}" if m.note else ""))
        if limit is not None and len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more modules (worst {limit} shown)")
        lines.append(f"{self.operation}: {len(self.modules)} modules, total params {self.total_params:,}, "
                     f"avg rank {self.avg_rank:.2f}, max rel error {self.max_rel_error:.2e}, {self.seconds:.2f} s")
        return "\n".join(lines)


def size_text(n: int) -> str:
    """Bytes as people read file sizes: 812 B, 85.0 KiB, 47.7 MiB, 6.46 GiB."""
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
