"""What the pack's LoRA sockets carry (ComfyUI type RSVD_LORA): a LoraSet plus how it was made."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from merge_core.keys.profiles import Naming
from merge_core.lora_file import LoraSet, summary, summary_lines
from merge_core.report import Report
from merge_core.result import MergeResult

LORA_TYPE = "RSVD_LORA"


@dataclass
class PackLora:
    """A LoRA in a graph: its modules (a LoraSet), a label, and the report and recipe of the step that made it."""

    lora: LoraSet
    label: str
    report: Optional[Report] = None
    recipe: Optional[dict] = None

    @classmethod
    def from_result(cls, result: MergeResult, label: str) -> "PackLora":
        """Wrap what merge/fuse/extract return, so the result can be merged again, applied, saved or reported."""
        naming = Naming(result.profile, result.arch, {name: name for name in result.modules})
        lora = LoraSet(dict(result.modules), naming, dict(result.metadata), peft_config=result.peft_config)
        return cls(lora, label, result.report, result.recipe or None)

    def describe(self) -> str:
        """Format, architecture, module count, kinds and ranks, and what needs care (DoRA, NaN/inf, alpha ≤ 0), as
        a few lines of text."""
        lines = [self.label] + [f"{label}: {text}" for label, text in summary_lines(summary(self.lora))]
        if self.report is not None:
            r = self.report
            lines.append(f"made by {r.operation}: avg rank {r.avg_rank:.1f}, max rel error {r.max_rel_error:.2e}, "
                         f"{r.seconds:.1f} s")
        return "\n".join(lines)


def summary_line(report: Report) -> str:
    """One line of totals: what the merge/fuse/extract nodes show on themselves (and a size budget's outcome)."""
    line = (f"{report.operation}: {len(report.modules)} modules, total params {report.total_params:,}, "
            f"avg rank {report.avg_rank:.2f}, max rel error {report.max_rel_error:.2e}, {report.seconds:.2f} s")
    budget = report.extra.get("size_budget")
    if budget:
        line += (f"; size budget {budget['target_bytes'] / 2**20:.1f} MB: ranks {budget['min_rank']}-"
                 f"{budget['max_rank']}, {100 * budget['energy_kept']:.1f} % of the energy kept")
    return line
