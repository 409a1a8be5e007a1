"""Extract a LoRA from two models, streaming: one tensor pair is read, differenced and decomposed at a time,
so memory stays near the largest layer; only the small output entries are kept (or written, see to_file)."""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional, Union

import torch

from ..adapters import AdapterModule, FullDiff
from ..checkpoint.lora_names import BIAS, Target
from ..checkpoint.sources import WeightSource, label_of, open_weights
from ..device import COMPUTE_DTYPE, resolve_device, with_cpu_fallback
from ..errors import MergeCoreError
from ..files.metadata import make_recipe
from ..lowrank.rank_select import RankRule
from ..report import Progress, Report
from ..result import MergeResult
from .options import DEFAULT_RANK, ExtractOptions
from .piece import extract_piece
from .plan import Plan, Task, make_plan

Source = Union[str, os.PathLike, WeightSource]


def iter_pieces(base: WeightSource, tuned: WeightSource, plan: Plan, opts: ExtractOptions, device: torch.device,
                report: Report, progress: Progress = None) -> Iterator[tuple[Target, AdapterModule]]:
    """(target, entry) for every changed delta, in base order; report rows and skips recorded as it goes."""
    total = len(plan.tasks)
    for done, task in enumerate(plan.tasks, 1):
        pieces = with_cpu_fallback(lambda dev, task=task: _task_pieces(base, tuned, task, opts, dev), device)
        if pieces is None:
            plan.skip("not_floating_point", task.key)
        for target, piece in pieces or []:
            if piece is None:
                plan.skip("unchanged", f"{target.name}.{target.role}")
                continue
            module, row = piece
            report.add(row)
            yield target, module
        if progress is not None:
            progress(done, total, task.key)


def _task_pieces(base: WeightSource, tuned: WeightSource, task: Task, opts: ExtractOptions, dev: torch.device):
    """Entries of one key's delta, or None for non-float tensors.  ΔW is built in place from a copy, so only
    one fp32 layer (plus one source tensor) is alive, and in-memory sources are never modified."""
    tuned_t = tuned.get(task.key)
    if not tuned_t.is_floating_point():
        return None
    delta = tuned_t.to(dev, COMPUTE_DTYPE, copy=True)
    del tuned_t
    base_t = base.get(task.key)
    if not base_t.is_floating_point():
        return None
    delta.sub_(base_t.to(dev, COMPUTE_DTYPE))
    del base_t
    return [(tg, extract_piece(tg, tg.take(delta).contiguous(), opts)) for tg in task.targets]


def attach(modules: dict[str, AdapterModule], target: Target, module: AdapterModule) -> None:
    """Put a weight entry and a bias entry (`.diff_b`) of the same name into one module."""
    have = modules.get(target.name)
    if have is None:
        modules[target.name] = module
    elif target.role == BIAS:
        have.diff_b = module.diff_b
    else:
        if isinstance(have, FullDiff) and have.diff is None:
            module.diff_b = have.diff_b
        modules[target.name] = module


def start(base: Source, tuned: Source, rule: Optional[RankRule], conv_rank: Optional[int], diff_only: bool,
          min_diff: float, text_encoders: bool, seed: int, base_kind: str = "auto", tuned_kind: str = "auto"):
    """Open both models, plan the run and make its report and recipe (shared by extract_lora and to_file)."""
    opts = ExtractOptions(rule or RankRule(rank=DEFAULT_RANK), conv_rank, diff_only, min_diff, text_encoders, seed)
    b = open_weights(base, base_kind, "--source-model")
    t = open_weights(tuned, tuned_kind, "--target-model")
    plan = make_plan(b, t, text_encoders)
    if not plan.tasks:
        raise MergeCoreError(f"nothing to extract: {label_of(base, 'base')} and {label_of(tuned, 'tuned')} share "
                             "no tensor a LoRA can hold (different models?)")
    recipe = make_recipe("extract", [label_of(base, "base (in memory)"), label_of(tuned, "tuned (in memory)")],
                         opts.describe(), hash_inputs=False)
    report = Report("extract", extra={"arch": plan.arch, "parameters": opts.describe()})
    return opts, b, t, plan, report, recipe


def finish(report: Report, plan: Plan, began: float, written: int, base: Source, tuned: Source) -> None:
    if written == 0:
        raise MergeCoreError(f"nothing to extract: no tensor differs between {label_of(base, 'base')} and "
                             f"{label_of(tuned, 'tuned')} by more than min-diff")
    report.seconds = time.perf_counter() - began
    report.extra["tasks"] = len(plan.tasks)
    report.extra["skipped"] = {reason: len(keys) for reason, keys in plan.skipped.items()}
    report.extra["skipped_keys"] = plan.skipped


def extract_lora(base: Source, tuned: Source, rule: Optional[RankRule] = None, conv_rank: Optional[int] = None,
                 diff_only: bool = False, min_diff: float = 0.0, text_encoders: bool = True, device: str = "auto",
                 seed: int = 0, progress: Progress = None, base_kind: str = "auto",
                 tuned_kind: str = "auto") -> MergeResult:
    """LoRA of tuned − base (paths or WeightSources), kohya names; rule None = fixed rank 32."""
    began = time.perf_counter()
    opts, b, t, plan, report, recipe = start(base, tuned, rule, conv_rank, diff_only, min_diff, text_encoders, seed,
                                             base_kind, tuned_kind)
    modules: dict[str, AdapterModule] = {}
    for target, module in iter_pieces(b, t, plan, opts, resolve_device(device), report, progress):
        attach(modules, target, module)
    finish(report, plan, began, len(modules), base, tuned)
    profile = "sdxl" if plan.arch == "sdxl" else "kohya"
    return MergeResult(modules, report, arch=plan.arch, profile=profile, recipe=recipe)
