"""Fuse N LoKr/LoHa/LoRA/full files module by module into one, exactly on the deltas.

plan_fuse checks the inputs and options before any work; run_fuse computes the modules (on worker threads on
the CPU, as merges do) and hands them to a sink in order: fuse_models keeps them (a MergeResult), fuse_to_file
(to_file.py) writes them as they come.  Per module: the inputs' exact operators (a model lacking the module
contributes ΔW = 0), the strategy's coefficients cᵢ (strategies.py), then T = Σ cᵢ ΔWᵢ in the output form
(output_forms.py).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..device import resolve_device
from ..errors import MergeCoreError, NonFiniteError, ShapeMismatchError, finite_numbers
from ..files.metadata import carried_metadata, make_recipe
from ..lora_file import LoraSet, check_dora, damaged_module_error, input_label
from ..lowrank import RankRule
from ..merge.scheduler import run_in_order
from ..name_match import disjoint_note, match_names
from ..report import ModuleReport, Progress, Report
from ..result import MergeResult
from .output_forms import FALLBACK_NOTE, Built, build_module, check_output_format, fused_bias
from .strategies import Coefficients, check_strategy, coefficients
from .terms import Term

log = logging.getLogger(__name__)

# lokr/auto need no rank rule; lora (and auto's fallback) default to 99.9 % of ‖T‖² within ranks 4..128
DEFAULT_RULE = RankRule(energy=0.999, min_rank=4, max_rank=128)


def resolve_weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    """The user weights: equal (1/N each) by default; their count must match the models'."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise MergeCoreError(f"number of weights ({len(weights)}) must match number of models ({n})")
    return finite_numbers(weights, "weights")


def check_inputs(sets: Sequence[LoraSet], dora: str) -> str:
    """DoRA policy and a common architecture; returns that architecture."""
    check_dora(sets, dora, "fused")
    odd = next((i for i, s in enumerate(sets) if s.arch != sets[0].arch), None)
    if odd is not None:
        raise ShapeMismatchError(f"inputs are for different models: {input_label(sets[0], 0)} is {sets[0].arch}, "
                                 f"{input_label(sets[odd], odd)} is {sets[odd].arch}")
    return sets[0].arch


def module_names(sets: Sequence[LoraSet]) -> list[str]:
    """Every module of any input, in first-seen order."""
    return list(dict.fromkeys(name for s in sets for name in s.modules))


def check_shapes(name: str, sets: Sequence[LoraSet], present: Sequence[int]) -> None:
    shapes = {i: sets[i].modules[name].matrix_shape for i in present
              if getattr(sets[i].modules[name], "has_weight", True)}
    if len(set(shapes.values())) > 1:
        i, a = next(iter(shapes.items()))
        j, b = next((k, v) for k, v in shapes.items() if v != a)
        raise ShapeMismatchError(f"module '{name}' is {a[0]}x{a[1]} in {input_label(sets[i], i)} but {b[0]}x{b[1]} "
                                 f"in {input_label(sets[j], j)}")


@dataclass
class FusePlan:
    """A checked fusion: the inputs, their weights, the options, and every module name (first-seen order)."""

    sets: list[LoraSet]
    weights: list[float]
    strategy: str
    norm_threshold: float
    output_format: str
    rule: RankRule
    dora: str
    arch: str
    names: list[str]
    dtype: Optional[str] = None  # the output file's, for the recipe, when a file is written

    @property
    def profile(self) -> str:
        return "sdxl" if self.arch == "sdxl" else "kohya"

    def parameters(self) -> dict:
        out = {"weights": self.weights, "strategy": self.strategy, "norm_threshold": self.norm_threshold,
               "output_format": self.output_format, "rank_rule": self.rule.describe(), "dora": self.dora}
        return out if self.dtype is None else {**out, "dtype": self.dtype}

    def recipe(self, digests: Optional[Sequence[Optional[str]]] = None) -> dict:
        """The recipe to write: inputs with their sha256 (hashed in the background since the plan was made)."""
        return make_recipe("fuse", [input_label(s, i) for i, s in enumerate(self.sets)], self.parameters(),
                           digests=digests if digests is not None else [s.sha256() for s in self.sets])

    def carried(self) -> dict[str, str]:
        return carried_metadata(s.metadata for s in self.sets)


def plan_fuse(sets: Sequence[LoraSet], weights: Optional[Sequence[float]] = None, strategy: str = "smart_fusion",
              norm_threshold: float = 1.0, output_format: str = "auto", rule: Optional[RankRule] = None,
              dora: str = "error") -> FusePlan:
    """Check everything that can be checked before any work (weights, strategy, form, DoRA, architecture, every
    module's shapes) and start hashing the inputs for the recipe."""
    sets = match_names(sets)
    if not sets:
        raise MergeCoreError("fuse needs at least one model")
    w = resolve_weights(weights, len(sets))
    check_strategy(strategy, w, norm_threshold)
    check_output_format(output_format)
    arch = check_inputs(sets, dora)
    note = disjoint_note(sets)
    if note:
        log.warning(note)
    names = module_names(sets)
    for name in names:
        check_shapes(name, sets, [i for i, s in enumerate(sets) if name in s.modules])
    for s in sets:  # the recipe's sha256, hashed on a spare core while the modules are fused
        s.start_digest()
    return FusePlan(sets, w, strategy, norm_threshold, output_format, rule or DEFAULT_RULE, dora, arch, names)


def fuse_module(name: str, sets: Sequence[LoraSet], present: Sequence[int], weights: Sequence[float],
                strategy: str, norm_threshold: float, output_format: str, rule: RankRule,
                device: torch.device) -> tuple[Built, list[float]]:
    """The written module for `name` and the coefficient cᵢ of every model (0 where absent)."""
    terms = [Term(i, sets[i].modules[name], device) for i in present]
    with_weight = [t for t in terms if t.has_weight]
    bias_only = [t for t in terms if not t.has_weight]
    total = sum(weights)
    coeffs = (coefficients(strategy, with_weight, [weights[t.index] for t in with_weight], total, norm_threshold)
              if with_weight else Coefficients([]))
    # a bias-only input has no ΔW to measure: it enters as in the weighted sum (or average)
    bias_c = [weights[t.index] / (total if strategy == "weighted_average" else 1.0) for t in bias_only]
    bias = fused_bias(with_weight + bias_only, coeffs.values + bias_c)
    notes = [n for n in (coeffs.note, f"in {len(present)} of {len(sets)} inputs" if len(present) < len(sets) else "")
             if n]
    built = build_module(output_format, name, with_weight, coeffs.values, rule, bias, "; ".join(notes))
    per_model = [0.0] * len(sets)
    for t, c in zip(with_weight + bias_only, coeffs.values + bias_c):
        per_model[t.index] = c
    return built, per_model


def finite_result(name: str, sets: Sequence[LoraSet], present: Sequence[int],
                  fuse: Callable[[], tuple[Built, list[float]]]) -> tuple[Built, list[float]]:
    """fuse(), or a NonFiniteError naming the input whose module `name` holds NaN/inf when the fusion failed on
    it or came out non-finite."""
    def damaged() -> Optional[int]:
        return next((i for i in present if not sets[i].modules[name].is_finite()), None)

    try:
        built, coeffs = fuse()
    except (torch.linalg.LinAlgError, NonFiniteError):
        bad = damaged()
        if bad is None:
            raise
        raise damaged_module_error(name, sets[bad], bad) from None
    if built.module is None or built.module.is_finite():
        return built, coeffs
    bad = damaged()
    if bad is None:
        raise NonFiniteError(f"module '{name}': the fused sum of finite inputs is beyond fp32's range")
    raise damaged_module_error(name, sets[bad], bad)


Sink = Callable[[str, Built, Any], None]  # (name, built module, prepare's result) in plan order


def run_fuse(plan: FusePlan, sink: Sink, device: str = "auto", progress: Progress = None,
             prepare: Optional[Callable[[str, Built], Any]] = None) -> Report:
    """Fuse every module and hand it to `sink` in plan order (prepare(name, built) runs on the worker that
    made it, e.g. the cast to the file's tensors); returns the report."""
    sets, rows, table = plan.sets, {}, {}

    def run(item: tuple[int, str], d: torch.device) -> tuple[Built, list[float], Any]:
        name = item[1]
        present = [i for i, s in enumerate(sets) if name in s.modules]
        with torch.no_grad():  # per thread
            built, coeffs = finite_result(name, sets, present, lambda: fuse_module(
                name, sets, present, plan.weights, plan.strategy, plan.norm_threshold, plan.output_format, plan.rule,
                d))
        ready = prepare(name, built) if prepare is not None and built.module is not None else None
        return built, coeffs, ready

    def finished(item: tuple[int, str], result: tuple[Built, list[float], Any]) -> None:
        rows[item[1]], table[item[1]] = result[0].row, result[1]
        if progress is not None:
            progress(len(rows), len(plan.names), item[1])

    start = time.perf_counter()
    run_in_order(deque(enumerate(plan.names)), run, lambda item, result: sink(item[1], result[0], result[2]),
                 resolve_device(device), finished=finished)
    report = Report("fuse")
    for name in plan.names:
        report.add(rows[name])
    report.seconds = time.perf_counter() - start
    _warn_fallbacks(report)
    report.extra.update(parameters=plan.parameters(), coefficients={name: table[name] for name in plan.names},
                        kinds=_kinds(report.modules))
    return report


def fuse_models(sets: Sequence[LoraSet], weights: Optional[Sequence[float]] = None, strategy: str = "smart_fusion",
                norm_threshold: float = 1.0, output_format: str = "auto", rule: Optional[RankRule] = None,
                device: str = "auto", dora: str = "error", progress: Progress = None) -> MergeResult:
    """Fuse LyCORIS/LoRA sets into one held in memory: per module T = Σ cᵢ ΔWᵢ (cᵢ from `strategy`), written as
    `output_format` (auto|lokr|lora|full).  `rule` bounds lora ranks (default 99.9 % energy, ranks 4..128)."""
    return collect(plan_fuse(sets, weights, strategy, norm_threshold, output_format, rule, dora), device, progress)


def collect(plan: FusePlan, device: str = "auto", progress: Progress = None) -> MergeResult:
    """Run `plan` into modules held in memory (plan order)."""
    modules = {}

    def keep(name: str, built: Built, _: Any) -> None:
        if built.module is not None:
            modules[name] = built.module

    report = run_fuse(plan, keep, device, progress)
    return MergeResult(modules, report, plan.arch, plan.profile, recipe=plan.recipe(), metadata=plan.carried())


def _kinds(rows: Sequence[ModuleReport]) -> dict[str, int]:
    return {k: sum(m.kind == k for m in rows) for k in {m.kind for m in rows}}


def _warn_fallbacks(report: Report) -> None:
    fell = [m for m in report.modules if FALLBACK_NOTE in m.note]
    if fell:
        log.warning("%d module(s) could not be written as lokr and were written as lora (see each module's note), "
                    "e.g. '%s': %s", len(fell), fell[0].name, fell[0].note)
