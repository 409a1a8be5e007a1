"""extract_lora: an extraction held in memory (what the ComfyUI nodes call with clean model weights as a
DictSource), optionally within a size budget."""
from __future__ import annotations

from typing import Optional

import torch

from ..adapters import AdapterModule
from ..lowrank.rank_select import RankRule
from ..report import Progress
from ..result import MergeResult
from .budget import fit_extraction
from .engine import Source, attach, open_run


def extract_lora(base: Source, tuned: Source, rule: Optional[RankRule] = None, conv_rank: Optional[int] = None,
                 diff_only: bool = False, min_diff: float = 0.0, text_encoders: bool = True, device: str = "auto",
                 seed: int = 0, progress: Progress = None, base_kind: str = "auto",
                 tuned_kind: str = "auto", target_size: Optional[int] = None) -> MergeResult:
    """LoRA of tuned − base (paths or WeightSources), kohya names; rule None = fixed rank 32.  `target_size`
    (bytes; a dynamic rule's bounds): ranks chosen to fit an fp16 .safetensors of that size (budget.py)."""
    run = open_run(base, tuned, rule, conv_rank, diff_only, min_diff, text_encoders, seed, base_kind, tuned_kind)
    if target_size is not None:
        run.report.extra["size_budget"] = fit_extraction(run, int(target_size), torch.float16, "extracted", device,
                                                         progress)
    modules: dict[str, AdapterModule] = {}
    for target, module in run.pieces(device, progress):
        attach(modules, target, module)
    run.finish(len(modules))
    profile = "sdxl" if run.plan.arch == "sdxl" else "kohya"
    return MergeResult(modules, run.report, arch=run.plan.arch, profile=profile, recipe=run.final_recipe())
