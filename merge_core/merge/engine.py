"""Merging N LoRA sets into one, module by module: plan (every check), run (batches on the device), collect.

Per module the target is T = Σ wᵢ·bᵢ·ΔWᵢ (weights applied once, as stacking LoRAs in LoraLoader does;
bᵢ the SDXL block weight), and the method writes a LoRA/LoCon with α = rank.  `plan_merge` runs all checks
(methods, weights, DoRA, architectures, shapes, method-specific ones) before the first module is computed;
`run_merge` hands each merged module to a sink as soon as it and the modules planned before it are done, so
a caller can write the file while the rest is computed (merge/to_file.py) or hold the modules
(`merge_loras`, for the nodes and the Python API).
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..adapters import AdapterModule, parameter_count
from ..device import resolve_device
from ..errors import MergeCoreError, NonFiniteError
from ..files.metadata import carried_metadata, make_recipe
from ..lora_file import LoraSet, check_dora, damaged_module_error, input_label
from ..lowrank import RankRule
from ..memory import available_on
from ..name_match import disjoint_note, match_names
from ..report import ModuleReport, Progress, Report
from ..result import MergeResult
from .block_weights import BlockWeights, block_weights_record
from .heap import HeapTrimmer
from .methods import Method, describe, method_named, resolve_options, resolve_weights
from .options import MergeOptions
from .outcome import Outcome, exact_sum_outcome
from .scheduler import DENSE_COPIES, run_in_order, worker_cap, worker_count
from .targets import ModuleTarget, plan_targets

log = logging.getLogger(__name__)

# called in the calling thread with each merged module, in plan order: sink(name, outcome, prepared)
Sink = Callable[[str, Outcome, Any], None]
# called on the worker thread that computed the outcome (e.g. to cast it to the file's dtype)
Prepare = Callable[[str, Outcome], Any]


def output_layout(sets: Sequence[LoraSet]) -> tuple[str, str, Optional[dict]]:
    """(arch, profile, peft_config) to write: kohya names for SDXL, PEFT names when every input had them, and
    the config of the first input that was a PEFT folder (None when none was: PEFT-named files)."""
    arch = "sdxl" if any(s.arch == "sdxl" for s in sets) else sets[0].arch
    if arch == "sdxl":
        return arch, "sdxl", None
    if all(s.profile == "peft" for s in sets):
        return arch, "peft", next((s.peft_config for s in sets if s.peft_config is not None), None)
    return arch, sets[0].profile, None


@dataclass
class MergePlan:
    """A merge with every check done: the batches to run (consumed by run_merge) and what the recipe says."""

    spec: Method
    opts: MergeOptions
    names: list[str]  # every output module, in the inputs' order (the report's order)
    work: deque  # (index, batch of ModuleTargets), in the order the sink sees them
    parameters: dict
    sets: list[LoraSet]
    layout: tuple[str, str, Optional[dict]]

    def targets(self) -> list[ModuleTarget]:
        """Every planned module (before the run consumes the work)."""
        return [t for _, batch in self.work for t in batch]

    def carried(self) -> dict[str, str]:
        """The inputs' metadata the output keeps: trigger words and training tags, combined."""
        return carried_metadata(s.metadata for s in self.sets)

    def peft_embeddings(self) -> frozenset[str]:
        """Modules any input held as a PEFT LoRA on an nn.Embedding (written back that way)."""
        return frozenset().union(*(s.peft_embeddings for s in self.sets))

    def peft_biases(self) -> bool:
        """A PEFT output carries lora_B biases: some module has a bias delta (every module then gets one)."""
        return self.layout[1] == "peft" and any(t.bias_shape is not None for t in self.targets())

    def recipe(self, digests: Optional[Sequence[Optional[str]]] = None) -> dict:
        """The recipe to write: inputs with their sha256 (hashed in the background since the plan was made,
        or since the files were opened; `digests` overrides them)."""
        return make_recipe("merge", [input_label(s, i) for i, s in enumerate(self.sets)], self.parameters,
                           digests=digests if digests is not None else [s.sha256() for s in self.sets])


def plan_merge(sets: Sequence[LoraSet], method: str = "rsvd", weights: Sequence[float] | None = None,
               rule: RankRule | None = None, solver: str | None = None, seed: int = 0, density: float = 0.5,
               block_weights: Sequence[BlockWeights | None] | None = None, dora: str = "error") -> MergePlan:
    """Check everything and group the modules into batches; see merge_loras for the arguments."""
    sets = match_names(sets)
    if not sets:
        raise MergeCoreError("merge needs at least one input")
    spec = method_named(method)
    w = resolve_weights(spec, len(sets), weights)
    opts: MergeOptions = resolve_options(spec, sets, rule, solver, seed, density)
    check_dora(sets, dora, "merged")
    targets = plan_targets(sets, w, block_weights)
    note = disjoint_note(sets)
    if note:
        log.warning(note)
    if spec.check is not None:
        spec.check(targets, sets)
    for s in sets:
        s.start_digest()
    batches = [[t] for t in targets if t.vector_only] + spec.batches([t for t in targets if not t.vector_only], opts)
    parameters = {"method": spec.name, "weights": w, **describe(spec, opts),
                  "block_weights": [block_weights_record(b) for b in block_weights] if block_weights else None,
                  "dora": dora}
    return MergePlan(spec, opts, [t.name for t in targets], deque(enumerate(batches)), parameters, sets,
                     output_layout(sets))


def cast_to(dtype: torch.dtype) -> Prepare:
    """A Prepare that casts each merged module's tensors to `dtype` on its worker thread."""
    return lambda name, out: out.module.to_dtype(dtype, name) if out.module is not None else None


def dense_worker_cap(plan: MergePlan, device: torch.device) -> Optional[int]:
    """For methods that hold whole dense modules, the most worker threads the memory free on `device` allows."""
    if not (plan.spec.dense or plan.opts.solver == "dense"):
        return None
    largest = max((4 * math.prod(t.matrix_shape) for t in plan.targets()), default=0)
    cap = worker_cap(largest, available_on(device))
    if cap is not None and cap < worker_count(device):
        log.warning("%s: %d worker threads instead of %d, so that each can hold %d dense modules of up to %.0f MiB "
                    "in half the free memory", plan.spec.name, cap, worker_count(device), DENSE_COPIES,
                    largest / 2**20)
    return cap


def check_finite(plan: MergePlan, batch: list[ModuleTarget], outs: Optional[list[Outcome]]) -> None:
    """A NonFiniteError naming the module and input when a module failed (outs None: the solver raised) or
    came out with a non-finite error because an input holds NaN/inf; a plain return when nothing is wrong."""
    for i, t in enumerate(batch):
        if outs is not None and math.isfinite(outs[i].quality.rel_error):
            continue
        term = t.non_finite_term()
        if term is not None:
            raise damaged_module_error(t.name, plan.sets[term.source], term.source)
        if outs is not None:
            raise NonFiniteError(f"module '{t.name}': the weighted sum of finite inputs is beyond fp32's range")


def _row(name: str, out: Outcome) -> ModuleReport:
    m = out.module
    return ModuleReport(name, m.kind if m is not None else "none", out.rank,
                        parameter_count(m) if m is not None else 0, out.quality.rel_error, out.quality.energy_kept,
                        out.note)


def run_merge(plan: MergePlan, sink: Sink, device: str = "auto", progress: Progress = None,
              prepare: Optional[Prepare] = None) -> Report:
    """Compute every planned module and hand it to `sink` in plan order; returns the report (inputs' order).

    The run keeps nothing of a module once the sink has it, and lets go of its inputs as it goes, so a caller
    that drops its own references as progress reports modules done (the CLI does) frees the inputs while the
    outputs are written."""
    spec, opts, work = plan.spec, plan.opts, plan.work
    dev = resolve_device(device)

    def run(item: tuple[int, list[ModuleTarget]], d: torch.device) -> list[tuple[Outcome, Any]]:
        batch = item[1]
        with torch.no_grad():  # per thread
            try:
                outs = [exact_sum_outcome(batch[0], d)] if batch[0].vector_only else spec.run_many(batch, opts, d)
            except (torch.linalg.LinAlgError, NonFiniteError):  # e.g. eigh on NaN: say which input is damaged
                check_finite(plan, batch, None)
                raise
        check_finite(plan, batch, outs)
        return [(o, prepare(t.name, o) if prepare is not None else None) for t, o in zip(batch, outs)]

    rows: dict[str, ModuleReport] = {}
    # dense methods churn whole modules: hand freed heap pages back as they go (the factored ones stay small)
    trim = HeapTrimmer(step=8 << 20) if spec.dense else None

    def finished(item: tuple[int, list[ModuleTarget]], results: list[tuple[Outcome, Any]]) -> None:
        for t, (out, _) in zip(item[1], results):
            rows[t.name] = _row(t.name, out)
            if progress is not None:
                progress(len(rows), len(plan.names), t.name)

    def emit(item: tuple[int, list[ModuleTarget]], results: list[tuple[Outcome, Any]]) -> None:
        for t, (out, ready) in zip(item[1], results):
            sink(t.name, out, ready)
        if trim is not None:
            trim()

    start = time.perf_counter()
    run_in_order(work, run, emit, dev, dense_worker_cap(plan, dev), finished)
    report = Report("merge")
    for name in plan.names:
        report.add(rows[name])
    report.seconds = time.perf_counter() - start
    report.extra.update(parameters=plan.parameters, inputs=[input_label(s, i) for i, s in enumerate(plan.sets)])
    return report


def collect(plan: MergePlan, device: str = "auto", progress: Progress = None,
            hold_dtype: Optional[torch.dtype] = None) -> MergeResult:
    """Run `plan` into modules held in memory (in the inputs' order); `hold_dtype`: keep them in this dtype
    (cast on the worker threads; default fp32)."""
    held: dict[str, AdapterModule] = {}

    def keep(name: str, out: Outcome, cast: Optional[AdapterModule]) -> None:
        if out.module is not None:
            held[name] = cast if cast is not None else out.module

    report = run_merge(plan, keep, device, progress, None if hold_dtype is None else cast_to(hold_dtype))
    modules = {name: held[name] for name in plan.names if name in held}
    arch, profile, peft_config = plan.layout
    embeddings = frozenset(modules) & plan.peft_embeddings()
    return MergeResult(modules, report, arch, profile, peft_config, recipe=plan.recipe(), metadata=plan.carried(),
                       peft_embeddings=embeddings)

