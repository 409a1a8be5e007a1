"""rsvd, svd and weighted_avg: the best low-rank factors of T = Σ cᵢ ΔWᵢ, never densified when factored.

Solvers (`--solver`):
- rsvd (default of `rsvd`): randomized SVD of the factored operator (seeded Gaussian sketch, k+p columns,
  q power iterations).  Up to a stacked rank R (gram_core_limit) a sketch costs more than solving exactly, so
  rsvd takes the exact Gram core (lowrank/gram_core.py) — the answer a full-width sketch would give.
- exact (default of `svd`/`weighted_avg`): the QR-core SVD of the stacked factors (Householder QR of both).
- dense: the kohya-style full SVD of the dense ΔW, for comparison.
Quality is exact: from all singular values (exact), the Grams (gram core), or traces (merge_core.lowrank).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..adapters import LoRA
from ..adapters.base import tucker_right
from ..lowrank import Dense, Factored, LowRank, Operator, RankRule, finite_total, low_rank, svd_of, truncate
from ..lowrank.gram_core import Stacked, gram_core, gram_low_rank, gram_low_rank_batch
from ..lowrank.rsvd import DEFAULT_OVERSAMPLE
from .options import MergeOptions
from .outcome import Outcome, lora_outcome
from .targets import ModuleTarget


# R ≤ width·(k+p): the Gram core, beyond it the sketch.  CPU, SDXL's linear shapes, k+p = 40, one thread: the
# Gram core took 1.8 / 3.5 / 6.7 / 13 / 32 / 58 s at R = 64 / 128 / 192 / 256 / 384 / 512, the sketch 9.9 / 15 /
# 21 / 33 / 54 / 82 s (the Gram core's R×R eigh grows as R³: 4.4 s of its 13 s at 256, 21 of 58 s at 512).  A
# GPU runs the sketch's products on the device but the Gram core's R×R work on the CPU: there, 2 (as before;
# not measured beyond R = 64).
GRAM_CORE_WIDTH_CPU = 8
GRAM_CORE_WIDTH_GPU = 2


def gram_core_limit(rule: RankRule, device: Optional[torch.device] = None) -> int:
    """Largest stacked rank R for which rsvd solves exactly instead of sketching on `device` (None: the CPU's,
    the largest, for planning batches)."""
    width = GRAM_CORE_WIDTH_CPU if device is None or device.type == "cpu" else GRAM_CORE_WIDTH_GPU
    return width * (rule.sketch_rank + DEFAULT_OVERSAMPLE)


def dense_low_rank(W: torch.Tensor, rule: RankRule, solver: str, seed: int) -> LowRank:
    """Best rank-k factors of a dense matrix (ties/dare results, full diffs), ‖W‖² accumulated in fp64."""
    total = finite_total(Dense(W))  # first: no SVD of NaN/inf
    return truncate(svd_of(Dense(W), solver, rule, seed), total, rule, tuple(W.shape))


def uses_gram_core(op: Operator, rule: RankRule, solver: str) -> bool:
    """rsvd on factors of a small stacked rank: solved exactly by the Gram core instead of a sketch."""
    return isinstance(op, Factored) and solver == "rsvd" and op.inner_rank <= gram_core_limit(rule, op.U.device)


def approximate(op: Operator, rule: RankRule, solver: str, seed: int) -> LowRank:
    """Best rank-k factors of `op` by `solver` (see the module docstring), k from `rule`."""
    if isinstance(op, Dense):
        return dense_low_rank(op.W, rule, solver, seed)
    if uses_gram_core(op, rule, solver):
        return gram_low_rank(op, rule)
    return low_rank(op, rule, solver, seed)


def spectrum_of(op: Operator, rule: RankRule, solver: str, seed: int) -> tuple[torch.Tensor, float]:
    """σ (descending; fp64, on the CPU) and ‖T‖² of `op` as approximate finds them, without the factors (the
    exact solver's are svd_of's too)."""
    if uses_gram_core(op, rule, solver):
        core = gram_core(Stacked.of(op))
        return core.S[0].cpu(), core.totals[0]
    total = finite_total(op)
    return svd_of(op, solver, rule, seed).S.to("cpu", torch.float64), total


def merge_lowrank(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> Outcome:
    """rsvd / svd / weighted_avg for one module (they differ only in default weights, rule and solver)."""
    lr = approximate(target.operator(device), opts.rule_for(target.name), opts.solver, opts.seed_for(target.name))
    return lora_outcome(target, lr.up, lr.down, lr.quality, device, target.note)


# ---------------------------------------------------------------- batches for the Gram core

BATCH_BYTES = 32 << 20  # fp32 factors per batch: enough modules to share the R×R calls, few enough to spread


def input_ranks(target: ModuleTarget) -> Optional[tuple[int, ...]]:
    """Each input's rank rᵢ when every input is a LoRA/LoCon (whose factors stack directly), else None."""
    terms = target.weighted
    if target.vector_only or not all(isinstance(t.module, LoRA) for t in terms):
        return None
    return tuple(t.module.rank for t in terms)


def plan_batches(targets: Sequence[ModuleTarget], opts: MergeOptions) -> list[list[ModuleTarget]]:
    """Modules the Gram core solves, grouped by (shape, input ranks) in batches of ≤ BATCH_BYTES; the rest
    alone."""
    if opts.solver != "rsvd":
        return [[t] for t in targets]
    singles, groups = [], {}
    for t in targets:
        ranks = input_ranks(t)
        if ranks is None or sum(ranks) > gram_core_limit(opts.rule):
            singles.append([t])
        else:
            groups.setdefault((t.matrix_shape, ranks), []).append(t)
    batches = []
    for ((out, n), ranks), group in groups.items():
        size = max(1, BATCH_BYTES // (4 * (out + n) * sum(ranks)))
        batches += [group[i:i + size] for i in range(0, len(group), size)]
    return singles + batches


def solved_together(batch: Sequence[ModuleTarget], opts: MergeOptions, device: torch.device) -> bool:
    """A batch from plan_batches goes through the Gram core at once on `device` (else module by module)."""
    return len(batch) > 1 and sum(input_ranks(batch[0])) <= gram_core_limit(opts.rule, device)


def stacked_factors(batch: Sequence[ModuleTarget], device: torch.device) -> Stacked:
    """A batch from plan_batches as the Gram core takes it: each module's inputs' up (out × rᵢ) and down
    (rᵢ × N, a Tucker conv's core folded in) as stored, and each column's scale cᵢ·αᵢ/rᵢ."""
    ups, downs = [], []
    c = torch.empty(len(batch), sum(input_ranks(batch[0])), dtype=torch.float64)
    for b, target in enumerate(batch):
        at, us, ds = 0, [], []
        for t in target.weighted:
            m: LoRA = t.module
            down = m.down if m.mid is None else tucker_right(m.mid.float(), m.down.float())
            us.append(m.up.flatten(1).to(device))
            ds.append(down.flatten(1).to(device))
            c[b, at:at + m.rank] = t.coeff * m.scale
            at += m.rank
        ups.append(us)
        downs.append(ds)
    return Stacked(ups, downs, c)


def merge_lowrank_batch(batch: Sequence[ModuleTarget], opts: MergeOptions, device: torch.device) -> list[Outcome]:
    """One batch from plan_batches: several same-shape modules through the Gram core at once."""
    if not solved_together(batch, opts, device):
        return [merge_lowrank(t, opts, device) for t in batch]
    results = gram_low_rank_batch(stacked_factors(batch, device), [opts.rule_for(t.name) for t in batch])
    return [lora_outcome(t, lr.up, lr.down, lr.quality, device, t.note) for t, lr in zip(batch, results)]
