"""ties, dare and dare_ties: defined on the dense deltas τᵢ = cᵢ·ΔWᵢ of one module at a time, then re-factored
with the same solver and rank rule as rsvd (the result is full rank, so it is approximated, not reproduced).

ties (Yadav et al. 2023): trim each τᵢ to its top `density` share of entries by magnitude; elect the sign
γ = sign(Σᵢ trimmed τᵢ) (total mass); disjoint mean: per entry, the mean of the trimmed τᵢ whose sign is γ.
dare (Yu et al. 2023): drop each entry of each τᵢ with probability p = 1 − density, rescale the kept ones by
1/(1 − p), and sum; the masks are seeded per module and input and drawn block of rows by block of rows.
dare_ties (as PEFT's add_weighted_adapter; mergekit's divides by the agreeing weights, not their count):
dare's drop and rescale (the same masks for the same seed), then ties' sign election and disjoint mean
instead of the sum.
All three are elementwise once each input's trim threshold is known (found exactly by a radix select over
blocks), so they run on blocks of rows rebuilt from the factors: memory holds the dense result and a few
small blocks, whatever the number of inputs.  The report's rel_error is against T = Σ cᵢΔWᵢ (how far the
method moves from plain stacking); each module's note gives the re-factoring error against the method's
own dense result ("fit").
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import MergeCoreError
from ..lowrank import Dense, Factored, Operator, measure
from ..lowrank.operators import row_blocks
from .lowrank_methods import approximate
from .options import MergeOptions
from .outcome import Outcome, combine_notes, lora_outcome
from .targets import ModuleTarget, Term

BLOCK = 1 << 17  # entries per block of rows on the CPU (512 KiB of fp32; ties holds about ten per worker)
CUDA_BLOCK = 1 << 24  # on a GPU (64 MiB of fp32: an SDXL module in one block), where each small block's
# handful of kernel launches, not its arithmetic, would set the time


def blocks_of(shape: tuple[int, int], device: torch.device) -> Iterator[slice]:
    """The blocks of rows ties and dare work through, sized for the device."""
    return row_blocks(*shape, BLOCK if device.type == "cpu" else CUDA_BLOCK)


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise MergeCoreError(f"density must be in (0, 1], got {density}")


def delta_rows(op: Operator, coeff: float, rows: slice) -> torch.Tensor:
    """Rows of τ = c·ΔW as a fresh fp32 block (safe to modify in place)."""
    return (op.U[rows] * coeff) @ op.V if isinstance(op, Factored) else op.W[rows] * coeff


def kth_largest_abs(op: Operator, coeff: float, k: int) -> float:
    """The exact k-th largest |τ| without a dense τ: a radix select on the float bits (for x ≥ 0 the int32
    view of a float32 is monotonic) — a histogram of the top 16 bits over blocks of rows, then an exact
    selection among the entries of the one bin that holds it."""
    hist = None
    for block in blocks_of(op.shape, op.device):
        top = delta_rows(op, coeff, block).abs_().view(torch.int32).flatten() >> 15
        counts = torch.bincount(top, minlength=1 << 16)
        hist = counts if hist is None else hist.add_(counts)
    from_top = hist.flip(0).cumsum(0)  # entries in the bins at or above each bin, from the top
    i = int(torch.searchsorted(from_top, torch.tensor([k], device=from_top.device)))
    above = int(from_top[i - 1]) if i > 0 else 0
    target_bin = (1 << 16) - 1 - i
    # the bin's entries, gathered into one buffer sized from the histogram: small pieces kept alive between
    # the blocks would pin the freed blocks' heap pages (tens of MiB per worker on the largest modules)
    candidates = torch.empty(int(hist[target_bin]), dtype=torch.int32, device=hist.device)
    at = 0
    for block in blocks_of(op.shape, op.device):
        bits = delta_rows(op, coeff, block).abs_().view(torch.int32).flatten()
        piece = bits[(bits >> 15) == target_bin]
        if at + piece.numel() > candidates.numel():
            break
        candidates[at:at + piece.numel()] = piece
        at += piece.numel()
    if at != candidates.numel():
        raise MergeCoreError("the device computed the same products twice with different results (a "
                             "non-deterministic matmul); run ties on the CPU")
    bits = candidates.kthvalue(candidates.numel() - (k - above) + 1).values
    return float(bits.view(torch.float32))


def floor_below(threshold: float) -> Optional[float]:
    """The float32 just below `threshold` (|τ| > it exactly when |τ| ≥ threshold); None: nothing is trimmed."""
    if threshold <= 0.0:
        return None
    return float(torch.nextafter(torch.tensor(threshold, dtype=torch.float32), torch.tensor(-math.inf)))


def trim(tau: torch.Tensor, floor: Optional[float]) -> torch.Tensor:
    """τ with its entries |τ| ≤ floor (from floor_below) set to zero, in place.  Float operations only
    (threshold(|τ|, floor, 0), then τ's sign back): building and applying a bool mask runs 5× slower on CPUs."""
    if floor is None:
        return tau
    return torch.copysign(torch.threshold(tau.abs(), floor, 0.0), tau, out=tau)


def disjoint_mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per entry, the mean of the τᵢ whose sign is the elected γ = sign(Σᵢ τᵢ) (0 where Σ is 0); the τᵢ
    are overwritten.  Float operations only: |τ| where τ·γ > 0, counted by its sign."""
    sign = sum(taus).sign_()
    total = count = None
    for tau in taus:
        agree = tau.mul_(sign).clamp_min_(0.0)
        total = agree if total is None else total.add_(agree)
        count = agree.sign() if count is None else count.add_(agree.sign())
    return total.div_(count.clamp_(min=1.0)).mul_(sign)


def drop_and_rescale(tau: torch.Tensor, density: float, gen: np.random.Generator, scratch: np.ndarray) -> torch.Tensor:
    """mᵢ⊙τ/density in place, mᵢ ~ Bernoulli(density) drawn on the CPU so any device gives the same masks (by
    numpy's PCG64: twice as fast as torch's CPU generator, whose draws were about a quarter of dare's time).
    `scratch`: fp32 room for τ's entries, reused block after block (fresh arrays' pages would be faulted in and
    handed back every time)."""
    if density >= 1.0:
        return tau
    r = gen.random(dtype=np.float32, out=scratch[:tau.numel()].reshape(tuple(tau.shape)))
    if tau.device.type == "cpu":  # r < density as a 0/1 float mask (see trim), in the scratch itself
        keep = torch.threshold_(torch.from_numpy(r).neg_().add_(density), 0.0, 0.0).sign_()
    else:  # to a GPU as bools: a quarter of the bytes across the bus
        keep = torch.from_numpy(r < density).to(tau.device)
    return tau.mul_(keep).div_(density)


def ties(terms: Sequence[Term], density: float, device: torch.device) -> torch.Tensor:
    ops = [t.module.operator(device) for t in terms]
    rows, cols = ops[0].shape
    keep = min(rows * cols, max(1, math.ceil(density * rows * cols)))
    floors = [floor_below(kth_largest_abs(op, t.coeff, keep)) if keep < rows * cols else None
              for op, t in zip(ops, terms)]
    out = torch.empty(rows, cols, device=device)
    for block in blocks_of((rows, cols), device):
        out[block] = disjoint_mean([trim(delta_rows(op, t.coeff, block), floor)
                                    for op, t, floor in zip(ops, terms, floors)])
    return out


def dare(terms: Sequence[Term], density: float, seed: int, device: torch.device, elect: bool = False) -> torch.Tensor:
    """Σᵢ mᵢ⊙τᵢ/density (elect: their disjoint mean instead, dare_ties), the masks seeded per input."""
    ops = [t.module.operator(device) for t in terms]
    rows, cols = ops[0].shape
    gens = [np.random.Generator(np.random.PCG64(seed + i)) for i in range(len(terms))]
    blocks = list(blocks_of((rows, cols), device))
    scratch = np.empty((blocks[0].stop - blocks[0].start) * cols, dtype=np.float32)  # the first block is the largest
    out = torch.empty(rows, cols, device=device)
    for block in blocks:
        kept = [drop_and_rescale(delta_rows(op, t.coeff, block), density, gen, scratch)
                for op, t, gen in zip(ops, terms, gens)]
        out[block] = disjoint_mean(kept) if elect else sum(kept)
    return out


def _refit(merged: torch.Tensor, target: ModuleTarget, opts: MergeOptions, seed: int,
           device: torch.device) -> Outcome:
    lr = approximate(Dense(merged), opts.rule_for(target.name), opts.solver, seed)
    del merged
    quality = measure(target.operator(device), lr.factored())
    return lora_outcome(target, lr.up, lr.down, quality, device,
                        combine_notes(f"fit {lr.quality.rel_error:.2e}", target.note))


DenseTarget = Callable[[ModuleTarget, MergeOptions, torch.device], torch.Tensor]


def ties_target(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> torch.Tensor:
    return ties(target.weighted, opts.density, device)


def dare_target(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> torch.Tensor:
    return dare(target.weighted, opts.density, opts.seed_for(target.name), device)


def dare_ties_target(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> torch.Tensor:
    return dare(target.weighted, opts.density, opts.seed_for(target.name), device, elect=True)


def refitted(dense_target: DenseTarget) -> Callable[[ModuleTarget, MergeOptions, torch.device], Outcome]:
    """The merge method that re-factors `dense_target`'s module with the run's solver and the module's rule."""
    def merge(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> Outcome:
        return _refit(dense_target(target, opts, device), target, opts, opts.seed_for(target.name), device)

    return merge
