"""Extract a LoRA from two models, streaming: one tensor pair is read, differenced and decomposed at a time,
so memory stays near the largest layer; only the small output entries are kept (or written, see to_file)."""
from __future__ import annotations

import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from ..adapters import AdapterModule, FullDiff
from ..checkpoint.lora_names import BIAS, Target
from ..checkpoint.sources import WeightSource, checkpoint_digest, digest_placeholder, label_of, open_weights
from ..device import COMPUTE_DTYPE, resolve_device, with_cpu_fallback
from ..errors import MergeCoreError, NonFiniteError
from ..files.metadata import make_recipe
from ..keys.diffusers_tables import halves_swapped
from ..lowrank.rank_select import RankRule
from ..report import Progress, Report
from .options import DEFAULT_RANK, ExtractOptions
from .piece import extract_piece
from .plan import Plan, Task, make_plan

Source = Union[str, os.PathLike, WeightSource]
Make = Callable[[Target, torch.Tensor, ExtractOptions], object]  # what is made of one target's part of ΔW
TaskResult = tuple[Task, Optional[list[tuple[Target, object]]]]


def task_results(base: WeightSource, tuned: WeightSource, plan: Plan, opts: ExtractOptions, device: torch.device,
                 make: Make = extract_piece, progress: Progress = None) -> Iterator[TaskResult]:
    """(task, [(target, make(target, its part of ΔW, opts))], or None for non-float tensors) for every task, one
    delta at a time; a delta holding NaN/inf is one error naming its tensor."""
    total = len(plan.tasks)
    for done, task in enumerate(plan.tasks, 1):
        try:
            made = with_cpu_fallback(lambda dev, task=task: _task_made(base, tuned, task, opts, dev, make), device)
        except NonFiniteError:
            raise NonFiniteError(f"tensor '{task.key}': the difference of the two models holds NaN or infinite values "
                                 "(a damaged checkpoint?); nothing was written") from None
        yield task, made
        if progress is not None:
            progress(done, total, task.key)


def _task_made(base: WeightSource, tuned: WeightSource, task: Task, opts: ExtractOptions, dev: torch.device,
               make: Make) -> Optional[list[tuple[Target, object]]]:
    delta = task_delta(base, tuned, task, dev)
    if delta is None:
        return None
    return [(tg, make(tg, tg.take(delta).contiguous(), opts)) for tg in task.targets]


def iter_pieces(results: Iterable[TaskResult], plan: Plan, report: Report) -> Iterator[tuple[Target, AdapterModule]]:
    """(target, entry) for every changed delta of `results` (entries or None), in base order; report rows and
    skips recorded as it goes."""
    for task, pieces in results:
        if pieces is None:
            plan.skip("not_floating_point", task.key)
        for target, piece in pieces or []:
            if piece is None:
                plan.skip("unchanged", f"{target.name}.{target.role}")
                continue
            module, row = piece
            report.add(row)
            yield target, module


def task_delta(base: WeightSource, tuned: WeightSource, task: Task, dev: torch.device) -> Optional[torch.Tensor]:
    """The task's ΔW: of its key, or its parts' stacked (halves swapped for `swap`)."""
    deltas = [key_delta(base, tuned, key, dev) for key in task.keys]
    if any(d is None for d in deltas):
        return None
    delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
    return halves_swapped(delta) if task.swap else delta


def key_delta(base: WeightSource, tuned: WeightSource, key: str, dev: torch.device) -> Optional[torch.Tensor]:
    """ΔW = tuned − base of one key in fp32 (None for non-float tensors), in place when the fp32 tuned tensor is
    our own conversion; a source's own tensors are never modified (in-memory weights stay clean), and about two
    fp32 layers are alive at a time."""
    tuned_t = tuned.get(key)
    if not tuned_t.is_floating_point():
        return None
    t32 = tuned_t.to(dev, COMPUTE_DTYPE)
    converted = t32 is not tuned_t
    del tuned_t
    base_t = base.get(key)
    if not base_t.is_floating_point():
        return None
    b32 = base_t.to(dev, COMPUTE_DTYPE)
    del base_t
    return t32.sub_(b32) if converted else t32 - b32


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


@dataclass
class Run:
    """One extraction, opened and planned from the headers: what extract_lora and extract_to_file share."""

    opts: ExtractOptions
    base: WeightSource
    tuned: WeightSource
    plan: Plan
    report: Report
    recipe: dict  # the inputs' sha256 as placeholders (it sizes the header): final_recipe() has them
    labels: tuple[str, str]
    digests: tuple[Future, Future]
    began: float = field(default_factory=time.perf_counter)
    prepared: Optional[Iterable[TaskResult]] = None  # every task's entries, made already (a size budget's)

    def pieces(self, device: Union[str, torch.device], progress: Progress) -> Iterator[tuple[Target, AdapterModule]]:
        """(target, entry) of every changed delta: the prepared ones, else made now, reading both models."""
        results = self.prepared if self.prepared is not None else \
            task_results(self.base, self.tuned, self.plan, self.opts, resolve_device(device), progress=progress)
        return iter_pieces(results, self.plan, self.report)

    def final_recipe(self) -> dict:
        """The recipe with both checkpoints' sha256 (None for a model in memory or a folder of shards); waits for
        the background hashes, which ran beside the extraction."""
        inputs = [{**entry, "sha256": digest.result()} for entry, digest in zip(self.recipe["inputs"], self.digests)]
        return {**self.recipe, "inputs": inputs}

    def finish(self, written: int) -> None:
        """Totals into the report; an error when nothing changed."""
        if written == 0:
            raise MergeCoreError(f"nothing to extract: no tensor differs between {self.labels[0]} and "
                                 f"{self.labels[1]} by more than min-diff ({self.opts.min_diff:g})")
        self.report.seconds = time.perf_counter() - self.began
        self.report.extra["tasks"] = len(self.plan.tasks)
        self.report.extra["skipped"] = {reason: len(keys) for reason, keys in self.plan.skipped.items()}
        self.report.extra["skipped_keys"] = self.plan.skipped


def open_run(base: Source, tuned: Source, rule: Optional[RankRule] = None, conv_rank: Optional[int] = None,
             diff_only: bool = False, min_diff: float = 0.0, text_encoders: bool = True, seed: int = 0,
             base_kind: str = "auto", tuned_kind: str = "auto") -> Run:
    """Open both models, plan the run, and start its report and recipe (rule None = fixed rank 32)."""
    opts = ExtractOptions(rule or RankRule(rank=DEFAULT_RANK), conv_rank, diff_only, min_diff, text_encoders, seed)
    b = open_weights(base, base_kind, "--source-model")
    t = open_weights(tuned, tuned_kind, "--target-model")
    labels = (label_of(base, "base (in memory)"), label_of(tuned, "tuned (in memory)"))
    plan = make_plan(b, t, text_encoders)
    if not plan.tasks:
        raise MergeCoreError(f"nothing to extract: {labels[0]} and {labels[1]} share no tensor a LoRA can hold "
                             "(different models?)")
    digests = (checkpoint_digest(base), checkpoint_digest(tuned))
    recipe = make_recipe("extract", list(labels), opts.describe(), digests=[digest_placeholder(d) for d in digests])
    report = Report("extract", extra={"arch": plan.arch, "parameters": opts.describe()})
    return Run(opts, b, t, plan, report, recipe, (str(labels[0]), str(labels[1])), digests)
