"""ties and dare: defined on the dense deltas τᵢ = cᵢ·ΔWᵢ of one module at a time, then re-factored with the
same solver and rank rule as rsvd (the result is full rank, so it is approximated, not reproduced).

ties (Yadav et al. 2023): trim each τᵢ to its top `density` share of entries by magnitude; elect the sign
γ = sign(Σᵢ trimmed τᵢ) (total mass); disjoint mean: per entry, the mean of the trimmed τᵢ whose sign is γ.
dare (Yu et al. 2023): drop each entry of each τᵢ with probability p = 1 − density (seeded per module and
input), rescale the kept ones by 1/(1 − p), and sum.
Inputs are streamed: each τᵢ is rebuilt from its factors when needed, so memory stays a few dense modules
whatever the number of inputs.  The report's rel_error is against T = Σ cᵢΔWᵢ (how far the method moves
from plain stacking); each module's note gives the re-factoring error against the method's own dense
result ("fit").
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import MergeCoreError
from ..lowrank import Dense, Factored, measure
from .lowrank_methods import approximate
from .options import MergeOptions
from .outcome import Outcome, combine_notes, lora_outcome
from .targets import ModuleTarget, Term


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise MergeCoreError(f"density must be in (0, 1], got {density}")


def delta(term: Term, device: torch.device) -> torch.Tensor:
    """τ = c·ΔW as a fresh dense fp32 matrix (safe to modify in place)."""
    op = term.module.operator(device)
    return (op.U * term.coeff) @ op.V if isinstance(op, Factored) else op.W * term.coeff


def kth_largest_abs(tau: torch.Tensor, k: int) -> float:
    """The k-th largest |τ| (exact selection; numpy's in-place partition on the CPU, which is faster)."""
    mags = tau.abs().flatten()
    n = mags.numel()
    if mags.device.type == "cpu":
        arr = mags.numpy()
        arr.partition(n - k)
        return float(arr[n - k])
    return float(mags.kthvalue(n - k + 1).values)


def kept(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask of the entries with |τ| ≥ threshold, from comparisons only (no float temporary)."""
    if threshold <= 0.0:
        return tau.ne(0)
    return tau.ge(threshold) | tau.le(-threshold)


def ties(terms: Sequence[Term], density: float, device: torch.device) -> torch.Tensor:
    n = math.prod(terms[0].module.matrix_shape)
    keep = min(n, max(1, math.ceil(density * n)))
    thresholds, mass = [], None
    for t in terms:  # pass 1: thresholds and the total trimmed mass
        tau = delta(t, device)
        thresholds.append(kth_largest_abs(tau, keep) if keep < n else 0.0)
        tau.mul_(kept(tau, thresholds[-1]))
        mass = tau if mass is None else mass.add_(tau)
    up, down = mass.gt(0), mass.lt(0)  # the elected sign, as two masks
    del mass, tau
    total = torch.zeros(terms[0].module.matrix_shape, device=device)
    count = torch.zeros(total.shape, dtype=torch.uint8 if len(terms) < 256 else torch.int32, device=device)
    for t, threshold in zip(terms, thresholds):  # pass 2: disjoint mean of the kept entries that agree with it
        tau = delta(t, device)
        agree = kept(tau, threshold)
        agree &= (tau.gt(0) & up) | (tau.lt(0) & down)
        total.add_(tau.mul_(agree))
        count.add_(agree)
    return total.div_(count.clamp_(min=1))


def dare(terms: Sequence[Term], density: float, seed: int, device: torch.device) -> torch.Tensor:
    """Σᵢ mᵢ⊙τᵢ/density with mᵢ ~ Bernoulli(density), drawn on the CPU so any device gives the same masks."""
    out = None
    for i, t in enumerate(terms):
        tau = delta(t, device)
        if density < 1.0:
            gen = torch.Generator(device="cpu").manual_seed(seed + i)
            drop = torch.rand(tau.shape, generator=gen).ge_(density).bool()
            tau.masked_fill_(drop.to(tau.device), 0.0).div_(density)
        out = tau if out is None else out.add_(tau)
    return out


def _refit(merged: torch.Tensor, target: ModuleTarget, opts: MergeOptions, seed: int,
           device: torch.device) -> Outcome:
    lr = approximate(Dense(merged), opts.rule, opts.solver, seed)
    del merged
    quality = measure(target.operator(device), lr.factored())
    return lora_outcome(target, lr.up, lr.down, quality, device,
                        combine_notes(f"fit {lr.quality.rel_error:.2e}", target.note))


def merge_ties(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> Outcome:
    seed = opts.seed_for(target.name)
    return _refit(ties(target.weighted, opts.density, device), target, opts, seed, device)


def merge_dare(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> Outcome:
    seed = opts.seed_for(target.name)
    return _refit(dare(target.weighted, opts.density, seed, device), target, opts, seed, device)
