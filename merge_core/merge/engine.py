"""merge_loras: N LoRA sets -> one, module by module, by one of the merge methods.

Per module the target is T = Σ wᵢ·bᵢ·ΔWᵢ (weights applied once, as stacking LoRAs in LoraLoader does;
bᵢ the SDXL block weight), and the method writes a LoRA/LoCon with α = rank.  All checks (methods,
weights, DoRA, architectures, shapes, method-specific ones) run before the first module is computed.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..adapters import parameter_count
from ..device import resolve_device
from ..errors import MergeCoreError
from ..files.metadata import make_recipe, sha256_of
from ..lora_file import LoraSet, check_dora
from ..lowrank import RankRule
from ..report import ModuleReport, Progress, Report
from ..result import MergeResult
from .heap import HeapTrimmer
from .methods import describe, method_named, resolve_options, resolve_weights
from .options import MergeOptions
from .outcome import Outcome, exact_sum_outcome
from .scheduler import run_work
from .targets import ModuleTarget, plan_targets


def _hash_in_background(sets: Sequence[LoraSet]) -> list[Future]:
    """sha256 of every input file for the recipe, computed on another thread while the merge runs
    (hashlib and file reads release the GIL); None for inputs that are not files."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-sha256")
    try:
        return [pool.submit(lambda p=s.source: sha256_of(p) if p is not None and Path(p).exists() else None)
                for s in sets]
    finally:
        pool.shutdown(wait=False)


def output_layout(sets: Sequence[LoraSet]) -> tuple[str, str, Optional[dict]]:
    """(arch, profile, peft_config) to write: kohya names for SDXL, PEFT layout when every input was PEFT."""
    arch = "sdxl" if any(s.arch == "sdxl" for s in sets) else sets[0].arch
    if arch == "sdxl":
        return arch, "sdxl", None
    if all(s.profile == "peft" for s in sets):
        return arch, "peft", sets[0].peft_config
    return arch, sets[0].profile, None


def _row(name: str, out: Outcome) -> ModuleReport:
    m = out.module
    return ModuleReport(name, m.kind if m is not None else "none", out.rank,
                        parameter_count(m) if m is not None else 0, out.quality.rel_error, out.quality.energy_kept,
                        out.note)


def merge_loras(sets: Sequence[LoraSet], method: str = "rsvd", weights: Sequence[float] | None = None,
                rule: RankRule | None = None, solver: str | None = None, seed: int = 0, device: str = "auto",
                density: float = 0.5, block_weights: Sequence[Sequence[float] | None] | None = None,
                dora: str = "error", progress: Progress = None) -> MergeResult:
    """Merge `sets` by `method` (see METHODS); None arguments take the method's defaults:
    weights 1/N (rsvd, weighted_avg) or 1.0 (others); rule dynamic 4..32 at 0.99 energy (rsvd, ties, dare)
    or the largest input rank fixed (svd, weighted_avg); solver rsvd or exact.  `block_weights`: per input,
    None or 20/12 SDXL block values.  `dora`: error (refuse DoRA inputs) or ignore (drop the magnitude)."""
    sets = list(sets)
    if not sets:
        raise MergeCoreError("merge needs at least one input")
    spec = method_named(method)
    w = resolve_weights(spec, len(sets), weights)
    opts: MergeOptions = resolve_options(spec, sets, rule, solver, seed, density)
    check_dora(sets, dora, "merged")
    targets = plan_targets(sets, w, block_weights)
    if spec.check is not None:
        spec.check(targets, sets)
    dev = resolve_device(device)
    hashes = _hash_in_background(sets)
    names = [t.name for t in targets]
    # the engine lets go of each input module once its outcome is recorded, so a caller that drops its own
    # references as progress reports modules done (the CLI does) frees the inputs while the outputs grow
    work = deque([[t] for t in targets if t.vector_only]
                 + spec.batches([t for t in targets if not t.vector_only], opts))
    del targets

    def run(batch: list[ModuleTarget], d: torch.device) -> list[Outcome]:
        with torch.no_grad():  # per thread
            if batch[0].vector_only:
                return [exact_sum_outcome(batch[0], d)]
            return spec.run_many(batch, opts, d)

    outcomes: dict[str, Outcome] = {}
    trim = HeapTrimmer(step=(8 if spec.dense else 64) << 20)  # dense methods churn whole modules

    def record(batch: list[ModuleTarget], outs: list[Outcome]) -> None:
        trim()
        for target, out in zip(batch, outs):
            outcomes[target.name] = out
            if progress is not None:
                progress(len(outcomes), len(names), target.name)

    start = time.perf_counter()
    run_work(work, run, record, dev, parallel=not spec.dense)
    report, modules = Report("merge"), {}
    for name in names:  # report and file in the inputs' module order
        out = outcomes[name]
        report.add(_row(name, out))
        if out.module is not None:
            modules[name] = out.module
    report.seconds = time.perf_counter() - start
    parameters = {"method": spec.name, "weights": w, **describe(spec, opts),
                  "block_weights": [list(b) if b is not None else None for b in block_weights] if block_weights
                  else None, "dora": dora}
    report.extra.update(parameters=parameters, inputs=[str(s.source) if s.source else f"input {i + 1}"
                                                       for i, s in enumerate(sets)])
    recipe = make_recipe("merge", [s.source if s.source is not None else f"input {i + 1}" for i, s in enumerate(sets)],
                         parameters, hash_inputs=False)
    for entry, digest in zip(recipe["inputs"], hashes):
        entry["sha256"] = digest.result()
    arch, profile, peft_config = output_layout(sets)
    return MergeResult(modules, report, arch, profile, peft_config, recipe=recipe)
