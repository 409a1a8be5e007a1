"""The Python API of merging: merge_loras, in memory (the nodes and the original scripts' wrappers use it)."""
from __future__ import annotations

from typing import Optional, Sequence

from ..lora_file import LoraSet
from ..lowrank import RankRule
from ..report import Progress
from ..result import MergeResult
from .block_weights import BlockWeights
from .budget import budget_rule, fit_to_size
from .engine import collect, plan_merge


def merge_loras(sets: Sequence[LoraSet], method: str = "rsvd", weights: Sequence[float] | None = None,
                rule: RankRule | None = None, solver: str | None = None, seed: int = 0, device: str = "auto",
                density: float = 0.5, block_weights: Sequence[BlockWeights | None] | None = None,
                dora: str = "error", progress: Progress = None, target_size: Optional[int] = None) -> MergeResult:
    """Merge `sets` by `method` (see METHODS) into modules held in memory (fp32); None arguments take the
    method's defaults: weights 1/N (rsvd, weighted_avg) or 1.0 (others); rule dynamic 4..32 at 0.99 energy
    (rsvd, ties, dare) or the largest input rank fixed (svd, weighted_avg); solver rsvd or exact.
    `block_weights`: per input, None or parse_block_weights' values (SDXL 20/12, Flux.1 58) or named pairs.
    `dora`: error (refuse DoRA inputs) or ignore (drop the magnitude).  `target_size` (bytes; every method that
    chooses ranks): ranks chosen so that the result saved as fp16 .safetensors takes at most that
    (budget.fit_to_size; the rule gives the bounds)."""
    if target_size is not None:
        rule = budget_rule(rule)
    plan = plan_merge(sets, method, weights, rule, solver, seed, density, block_weights, dora)
    budget = fit_to_size(plan, target_size, "fp16", device=device) if target_size is not None else None
    result = collect(plan, device, progress)
    if budget is not None:
        result.report.extra["size_budget"] = budget
    return result
