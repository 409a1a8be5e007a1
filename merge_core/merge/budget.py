"""A size budget for a merge (--target-size): phase 1 finds every module's singular values with the method's own
solver — the Gram core's R×R eigenproblem where rsvd uses it (lowrank_methods), else its SVD; for ties/dare/dare_ties
the SVD of the dense module they re-factor — lowrank.size_budget allocates the ranks, and the merge then runs
as usual with each module's allocated rank (MergeOptions.ranks): the spectral work is done twice (rsvd: about
1.4× the merge time; ties/dare: 2×)."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import replace
from typing import Optional, Sequence

import torch

from ..device import resolve_device
from ..errors import MergeCoreError
from ..files.stream_writer import data_offset
from ..lora_file import dtype_of
from ..lora_stream import ALPHA_BYTES
from ..lowrank import Dense, RankRule
from ..lowrank.gram_core import gram_core
from ..lowrank.size_budget import Spectrum, check_room, fit, spectrum
from ..report import Progress
from .engine import MergePlan, dense_worker_cap
from .lowrank_methods import solved_together, spectrum_of, stacked_factors
from .scheduler import run_work
from .targets import ModuleTarget
from .to_file import header_reserve_for


def budget_rule(rule: Optional[RankRule]) -> RankRule:
    """The rule a size budget chooses ranks within: the one given, else the default bounds (not the method's
    own default, e.g. svd's fixed largest input rank, which would leave the budget nothing to choose)."""
    return RankRule() if rule is None else rule


def _spectra_batch(batch: Sequence[ModuleTarget], plan: MergePlan, device: torch.device) -> list[tuple]:
    """(name, σ descending (fp64, CPU), ‖T‖²) for each module of one planned batch, by the method's solver."""
    opts = plan.opts
    if solved_together(batch, opts, device):  # a Gram-core batch (plan_batches)
        core = gram_core(stacked_factors(batch, device))
        return [(t.name, core.S[b].cpu(), core.totals[b]) for b, t in enumerate(batch)]
    rows = []
    for t in batch:  # ties, dare, dare_ties: the dense module the method re-factors; else T, as approximate sees it
        op = (Dense(plan.spec.dense_target(t, opts, device)) if plan.spec.dense_target is not None
              else t.operator(device))
        rows.append((t.name, *spectrum_of(op, opts.rule, opts.solver, opts.seed_for(t.name))))
    return rows


def spectra_of(plan: MergePlan, bytes_per_element: int, device: torch.device,
               progress: Progress = None) -> list[Spectrum]:
    """Every factored module's spectrum (phase 1), on worker threads as the merge runs; the plan's work is
    left as it was."""
    found: dict[str, tuple] = {}
    count = sum(len(batch) for _, batch in plan.work if not batch[0].vector_only)

    def run(item, d):
        with torch.no_grad():
            return _spectra_batch(item[1], plan, d)

    def record(item, rows):
        for name, s, total in rows:
            found[name] = (s, total)
            if progress is not None:
                progress(len(found), count, name)

    run_work(deque(item for item in plan.work if not item[1][0].vector_only), run, record, device,
             dense_worker_cap(plan, device))
    return [spectrum(t.name, *found[t.name], t.matrix_shape, bytes_per_element, plan.opts.rule)
            for t in plan.targets() if t.name in found]


def fixed_bytes(plan: MergePlan, bytes_per_element: int, dtype: str, title: str) -> int:
    """The weights file's bytes that do not depend on the ranks: 8 + the reserved header, and (kohya) alphas
    (fp32), bias deltas and vector-only modules, or (PEFT) the lora_B biases."""
    reserve = header_reserve_for(plan, dtype, title)
    out = data_offset(reserve)
    if plan.layout[1] == "peft":  # no alphas; lora_B.bias on every module once one has a bias delta
        biases = plan.peft_biases()
        return out + sum(t.weight_shape[0] * bytes_per_element for t in plan.targets() if biases and not t.vector_only)
    for t in plan.targets():
        if not t.vector_only:
            out += ALPHA_BYTES
        elif t.weight_shape:
            out += math.prod(t.weight_shape) * bytes_per_element
        if t.bias_shape is not None:
            out += math.prod(t.bias_shape) * bytes_per_element
    return out


def fit_to_size(plan: MergePlan, target_bytes: int, dtype: str = "fp16", title: str = "merged",
                device: str = "auto", progress: Progress = None) -> dict:
    """Give every module of `plan` the rank that keeps the most of Σ‖T‖² in a file of ≤ target_bytes (the plan's
    opts get the ranks); returns the summary for the report and the recipe."""
    if plan.spec.solver is None:
        raise MergeCoreError(f"--target-size chooses ranks; {plan.spec.name}'s rank follows from its inputs")
    if plan.opts.rule.rank is not None:
        raise MergeCoreError("--target-size chooses the ranks: it cannot be combined with a fixed --rank")
    width = dtype_of(dtype).itemsize
    plan.parameters["target_size"] = int(target_bytes)
    fixed = fixed_bytes(plan, width, dtype, title)
    check_room(target_bytes, fixed)  # before the spectra's work
    spectra = spectra_of(plan, width, resolve_device(device), progress)
    ranks, summary = fit(spectra, target_bytes, fixed,
                         f"the {plan.spec.name} result" if plan.spec.dense_target is not None else "T")
    plan.opts = replace(plan.opts, ranks=ranks)
    return summary
