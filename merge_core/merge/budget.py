"""A size budget for a merge: the per-module ranks that keep the most of the network's ‖T‖² in a .safetensors
file of at most a given size.

    maximize Σₘ Σ_{i≤kₘ} σ²ₘᵢ   subject to   Σₘ kₘ·cₘ ≤ B,   lowₘ ≤ kₘ ≤ highₘ

cₘ = (out + in·kh·kw) × bytes per element is what one unit of rank costs module m; B is the target size less
the header and the tensors that do not depend on rank (alphas, bias deltas, vector-only modules); lowₘ and
highₘ are the rank rule's min/max (never more than the module's non-null singular values).  Minimising the
total squared error Σₘ‖Tₘ − T̂ₘ‖² is the same problem.  It is solved greedily from every module at lowₘ, by
gain per byte σ²ₘ,ₖ₊₁/cₘ: a module's gains fall as k grows, so the greedy is the optimum of the continuous
relaxation and its integer solution is within one rank step of the best (a step that did not fit).

Phase 1 (spectra_of) computes every module's singular values with the method's own solver — the Gram
core's R×R eigenproblem for stacked ranks ≤ 2(k+p), else its SVD; for ties/dare/dare_ties the SVD of the
dense module they re-factor — and the merge then runs as usual with each module's allocated rank
(MergeOptions.ranks): the spectral work is done twice (rsvd: about 1.4× the merge time; ties/dare: 2×).
"""
from __future__ import annotations

import heapq
import math
import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from ..device import resolve_device
from ..errors import MergeCoreError
from ..lora_file import dtype_of
from ..lowrank import Dense, Factored, finite_total, svd_of
from ..lowrank.rank_select import NULL_TOL
from ..report import Progress
from .engine import MergePlan, dense_worker_cap
from .gram_core import gram_core
from .lowrank_methods import gram_core_limit, input_ranks, stacked_factors
from .scheduler import run_work
from .targets import ModuleTarget
from .to_file import has_bias, header_reserve_for

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_size(text: str) -> int:
    """'100MB' (10⁶), '64MiB' (2²⁰), '1.5GB', '123456' (bytes) -> bytes."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = found.group(2).lower() if found else None
    if unit not in UNITS:
        raise MergeCoreError(f"a size is a number with an optional unit (KB, MB, GB, KiB, MiB, GiB), got {text!r}")
    return int(float(found.group(1)) * UNITS[unit])


@dataclass(frozen=True)
class Spectrum:
    """One module's place in the budget: σ² (descending, non-null ones only), ‖T‖², bytes per unit of rank."""

    name: str
    sq: tuple[float, ...]
    total: float
    cost: int
    low: int
    high: int


def allocate(spectra: Sequence[Spectrum], budget: int) -> dict[str, int]:
    """Ranks maximising the kept Σσ² within `budget` bytes (greedy by gain per byte; see the module docstring)."""
    ranks = {s.name: s.low for s in spectra}
    spent = sum(s.low * s.cost for s in spectra)
    if spent > budget:
        raise MergeCoreError(f"the budget is too small: every module at its minimum rank already takes "
                             f"{spent / 2**20:.1f} MiB of tensors, {budget / 2**20:.1f} MiB are left after the "
                             "header and fixed tensors; lower --min-rank or raise --target-size")
    heap = [(-s.sq[s.low] / s.cost, i) for i, s in enumerate(spectra) if s.low < s.high]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        s = spectra[i]
        if spent + s.cost > budget:
            continue  # its later steps cost the same: the module stays where it is
        k = ranks[s.name] = ranks[s.name] + 1
        spent += s.cost
        if k < s.high:
            heapq.heappush(heap, (-s.sq[k] / s.cost, i))
    return ranks


def kept(spectra: Sequence[Spectrum], ranks: dict[str, int]) -> float:
    """Σ of the kept σ² over Σ‖T‖² (1 for an all-zero merge)."""
    total = sum(s.total for s in spectra)
    return sum(sum(s.sq[:ranks[s.name]]) for s in spectra) / total if total > 0 else 1.0


def uniform(spectra: Sequence[Spectrum], budget: int) -> Optional[int]:
    """The largest rank u such that every module at clamp(u, low, high) fits in `budget` (None: not even 1)."""
    best, top = None, max((s.high for s in spectra), default=0)
    for u in range(1, top + 1):
        if sum(min(max(u, s.low), s.high) * s.cost for s in spectra) > budget:
            break
        best = u
    return best


def _spectra_batch(batch: Sequence[ModuleTarget], plan: MergePlan, device: torch.device) -> list[tuple]:
    """(name, σ descending (fp64, CPU), ‖T‖²) for each module of one planned batch, by the method's solver."""
    opts = plan.opts
    if plan.spec.dense_target is not None:  # ties, dare, dare_ties: the dense module the method re-factors
        t = batch[0]
        W = Dense(plan.spec.dense_target(t, opts, device))
        total = finite_total(W)
        return [(t.name, svd_of(W, opts.solver, opts.rule, opts.seed_for(t.name)).S.to("cpu", torch.float64), total)]
    if len(batch) > 1:  # a Gram-core batch (plan_batches)
        core = gram_core(stacked_factors(batch, device))
        return [(t.name, core.S[b].cpu(), core.totals[b]) for b, t in enumerate(batch)]
    t = batch[0]
    op = t.operator(device)
    total = finite_total(op)
    ranks = input_ranks(t)
    if opts.solver == "rsvd" and ranks is not None and sum(ranks) <= gram_core_limit(opts.rule):
        core = gram_core(stacked_factors(batch, device))
        return [(t.name, core.S[0].cpu(), core.totals[0])]
    solver = "exact" if opts.solver == "exact" and isinstance(op, Factored) else opts.solver
    return [(t.name, svd_of(op, solver, opts.rule, opts.seed_for(t.name)).S.to("cpu", torch.float64), total)]


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
             dense_worker_cap(plan) if device.type == "cpu" else None)
    rule, out = plan.opts.rule, []
    for t in plan.targets():
        if t.name not in found:
            continue
        s, total = found[t.name]
        available = int((s > s[0] * NULL_TOL).sum()) if len(s) and s[0] > 0 and total > 0 else 0
        sq = tuple(float(x) ** 2 for x in s[:available])
        high = min(rule.max_rank, available, min(t.matrix_shape))
        out.append(Spectrum(t.name, sq, float(total), sum(t.matrix_shape) * bytes_per_element,
                            min(rule.min_rank, high), high))
    return out


def fixed_bytes(plan: MergePlan, bytes_per_element: int, dtype: str, title: str) -> int:
    """The weights file's bytes that do not depend on the ranks: 8 + the reserved header, and (kohya) alphas
    (fp32), bias deltas and vector-only modules, or (PEFT) the lora_B biases."""
    reserve = header_reserve_for(plan, dtype, title)
    out = 8 + -(-reserve // 8) * 8
    if plan.layout[1] == "peft":  # no alphas; lora_B.bias on every module once one has a bias delta
        biases = any(has_bias(t) for t in plan.targets())
        return out + sum(t.weight_shape[0] * bytes_per_element for t in plan.targets()
                         if biases and not t.vector_only)
    for t in plan.targets():
        if not t.vector_only:
            out += 4
        elif t.weight_shape:
            out += math.prod(t.weight_shape) * bytes_per_element
        bias = next((x.module.diff_b for x in t.terms if x.module.diff_b is not None), None)
        if bias is not None:
            out += bias.numel() * bytes_per_element
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
    if fixed >= target_bytes:
        raise MergeCoreError(f"the budget is too small: the header and the tensors that do not depend on rank "
                             f"already take {fixed / 2**20:.2f} MiB; raise --target-size")
    spectra = spectra_of(plan, width, resolve_device(device), progress)
    budget = target_bytes - fixed
    ranks = allocate(spectra, budget)
    plan.opts = replace(plan.opts, ranks=ranks)
    u = uniform(spectra, budget)
    chosen = [ranks[s.name] for s in spectra]
    of = f"the {plan.spec.name} result" if plan.spec.dense_target is not None else "T"
    return {"target_bytes": int(target_bytes), "energy_of": of,
            "file_bytes": fixed + sum(ranks[s.name] * s.cost for s in spectra),
            "min_rank": min(chosen, default=0), "max_rank": max(chosen, default=0),
            "avg_rank": sum(chosen) / len(chosen) if chosen else 0.0,
            "energy_kept": kept(spectra, ranks),
            "uniform_rank": u,
            "uniform_energy_kept": kept(spectra, {s.name: min(max(u, s.low), s.high) for s in spectra})
            if u is not None else None}


def budget_line(summary: dict, path) -> str:
    """One line for the CLI: the target, the file as written, the ranks, and the energy kept against one rank
    for all modules in the same size."""
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    size = path.stat().st_size if path.exists() else summary["file_bytes"]
    line = (f"size budget {mib(summary['target_bytes'])}: {path.name} is {mib(size)}; ranks "
            f"{summary['min_rank']}-{summary['max_rank']} (avg {summary['avg_rank']:.1f}); kept "
            f"{100 * summary['energy_kept']:.2f} % of the energy of {summary['energy_of']}")
    if summary["uniform_rank"] is not None:
        line += (f" (one rank for all modules in that size, {summary['uniform_rank']}, keeps "
                 f"{100 * summary['uniform_energy_kept']:.2f} %)")
    return line
