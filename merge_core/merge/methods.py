"""The merge methods: what each computes per module and its defaults (weights, rank rule, solver)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import MergeCoreError, finite_numbers
from ..lora_file import LoraSet
from ..lowrank import SOLVERS, RankRule
from .concat import merge_concat
from .geometric_mean import check_factor_shapes, merge_geometric_mean
from .lowrank_methods import merge_lowrank, merge_lowrank_batch, plan_batches
from .options import MergeOptions
from .outcome import Outcome
from .targets import ModuleTarget
from .ties_dare import DenseTarget, check_density, dare_target, dare_ties_target, refitted, ties_target

ModuleMerge = Callable[[ModuleTarget, MergeOptions, torch.device], Outcome]
BatchMerge = Callable[[Sequence[ModuleTarget], MergeOptions, torch.device], list[Outcome]]
Planner = Callable[[Sequence[ModuleTarget], MergeOptions], list[list[ModuleTarget]]]
Check = Callable[[Sequence[ModuleTarget], Sequence[LoraSet]], None]


@dataclass(frozen=True)
class Method:
    name: str
    run: ModuleMerge
    summary: str
    average: bool = False  # default weights 1/N (else 1.0 each)
    solver: Optional[str] = None  # default solver; None: no SVD, rank rule and solver do not apply
    input_rank: bool = False  # default rank: the largest input rank, fixed (else the dynamic rule)
    uses_density: bool = False
    dense: bool = False  # works on whole dense ΔW: the heap is trimmed as modules come and go
    check: Optional[Check] = None  # run over all modules before any work
    plan: Optional[Planner] = None  # groups modules computed together (default: one at a time)
    run_batch: Optional[BatchMerge] = None
    dense_target: Optional[DenseTarget] = None  # the dense module a re-factoring method approximates (ties, dare)

    def batches(self, targets: Sequence[ModuleTarget], opts: MergeOptions) -> list[list[ModuleTarget]]:
        return self.plan(targets, opts) if self.plan is not None else [[t] for t in targets]

    def run_many(self, batch: Sequence[ModuleTarget], opts: MergeOptions, device: torch.device) -> list[Outcome]:
        if self.run_batch is not None:
            return self.run_batch(batch, opts, device)
        return [self.run(t, opts, device) for t in batch]


_ALL = (
    Method("rsvd", merge_lowrank, "randomized SVD of T = Σ wᵢΔWᵢ on the factors, dynamic rank (default)",
           average=True, solver="rsvd", plan=plan_batches, run_batch=merge_lowrank_batch),
    Method("svd", merge_lowrank, "exact truncated SVD of T (QR core), rank = largest input rank",
           solver="exact", input_rank=True, plan=plan_batches, run_batch=merge_lowrank_batch),
    Method("weighted_avg", merge_lowrank, "svd with weights 1/N each", average=True, solver="exact",
           input_rank=True, plan=plan_batches, run_batch=merge_lowrank_batch),
    Method("concat", merge_concat, "exact: factors side by side, rank Σ rᵢ"),
    Method("geometric_mean", merge_geometric_mean, "elementwise signed geometric mean of the factors "
           "(equal ranks; not gauge invariant)", check=check_factor_shapes),
    Method("ties", refitted(ties_target), "TIES (trim, elect sign, disjoint mean) on each dense ΔW, re-factored",
           solver="rsvd", uses_density=True, dense=True, dense_target=ties_target),
    Method("dare", refitted(dare_target), "DARE (random drop + rescale, seeded) on each dense ΔW, re-factored",
           solver="rsvd", uses_density=True, dense=True, dense_target=dare_target),
    Method("dare_ties", refitted(dare_ties_target), "DARE's drop + rescale, then TIES' sign election and disjoint "
           "mean, re-factored", solver="rsvd", uses_density=True, dense=True, dense_target=dare_ties_target),
)
REGISTRY = {m.name: m for m in _ALL}
METHODS = tuple(REGISTRY)


def method_named(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MergeCoreError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None


def resolve_weights(method: Method, n: int, weights: Optional[Sequence[float]]) -> list[float]:
    if weights is None:
        return [1.0 / n if method.average else 1.0] * n
    if len(weights) != n:
        raise MergeCoreError(f"number of weights ({len(weights)}) must match number of inputs ({n})")
    return finite_numbers(weights, "weights")


def largest_input_rank(sets: Sequence[LoraSet]) -> int:
    ranks = [m.rank for s in sets for m in s.modules.values() if m.kind != "full" and m.rank > 0]
    return max(ranks, default=1)


def resolve_options(method: Method, sets: Sequence[LoraSet], rule: Optional[RankRule], solver: Optional[str],
                    seed: int, density: float) -> MergeOptions:
    """The run's options: the method's defaults where the caller left None; density checked where used."""
    if method.uses_density:
        check_density(density)
    if method.solver is None:  # concat, geometric_mean: no rank rule, no solver
        return MergeOptions(RankRule(), "", int(seed), float(density))
    if solver is not None and solver not in SOLVERS:
        raise MergeCoreError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if rule is None:
        rule = RankRule(rank=largest_input_rank(sets)) if method.input_rank else RankRule()
    return MergeOptions(rule, solver or method.solver, int(seed), float(density))


def describe(method: Method, opts: MergeOptions) -> dict:
    """The parameters that shaped the result (for the recipe and the report)."""
    out: dict = {}
    if method.solver is not None:
        out.update(rank_rule=opts.rule.describe(), solver=opts.solver)
    if method.solver is not None or method.uses_density:
        out["seed"] = opts.seed
    if method.uses_density:
        out["density"] = opts.density
    return out
