"""One delta -> one LoRA file entry: a LoRA/LoCon by randomized SVD, or a full `.diff` / `.diff_b`.

weight, 2-D or conv:  ΔW ≈ up @ down, rank by the rule on the exact ‖ΔW‖_F² (rSVD, oversampling 8,
2 power iterations, seeded per module); stored with α = rank (scale 1).  When a rank-k LoRA would hold
at least as many numbers as ΔW itself (k·(out+in) ≥ out·in) the exact `.diff` is stored instead.
weight, 1-D (norms, scalars) or --diff-only:  `.diff`.   bias:  `.diff_b`.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..adapters import FullDiff, LoRA, parameter_count
from ..adapters.base import matrix_shape
from ..checkpoint.lora_names import BIAS, Target
from ..lowrank import Dense, low_rank
from ..lowrank.quality import Quality
from ..report import ModuleReport
from .options import OVERSAMPLE, POWER_ITERS, ExtractOptions

Module = Union[LoRA, FullDiff]


def full_piece(target: Target, delta: torch.Tensor, note: str = "") -> tuple[Module, ModuleReport]:
    d = delta.detach().to("cpu").contiguous()
    module = FullDiff(diff_b=d) if target.role == BIAS else FullDiff(d)
    return module, ModuleReport(target.name, "full", 0, d.numel(), 0.0, 1.0, note or target.role)


def piece_kind(target: Target, delta: torch.Tensor, opts: ExtractOptions) -> Optional[str]:
    """What extract_piece makes of `delta`: None (unchanged: max |ΔW| ≤ min_diff), "full" (a bias, a 1-D
    weight, --diff-only) or "lora" (a LoRA/LoCon, or a full diff when no smaller rank exists)."""
    if delta.numel() == 0:
        return None
    low, high = torch.aminmax(delta)
    if max(-float(low), float(high)) <= opts.min_diff:
        return None
    return "full" if target.role == BIAS or opts.diff_only or delta.ndim < 2 else "lora"


def extract_piece(target: Target, delta: torch.Tensor, opts: ExtractOptions) -> Optional[tuple[Module, ModuleReport]]:
    """The entry for `delta` (fp32, on the compute device), or None when max |ΔW| ≤ min_diff (unchanged)."""
    kind = piece_kind(target, delta, opts)
    if kind is None:
        return None
    if kind == "full":
        return full_piece(target, delta)
    shape = tuple(delta.shape)
    out, n = matrix_shape(shape)
    lr = low_rank(Dense(delta.reshape(out, n)), opts.rule_for(shape), "rsvd", seed=opts.seed_for(target.name),
                  oversample=OVERSAMPLE, power_iters=POWER_ITERS)
    k = lr.rank
    if k * (out + n) >= out * n:
        return full_piece(target, delta, f"full diff: rank {k} would not be smaller")
    return lora_piece(target, shape, lr.up, lr.down, lr.quality)


def lora_piece(target: Target, shape: tuple[int, ...], up: torch.Tensor, down: torch.Tensor,
               quality: Quality) -> tuple[Module, ModuleReport]:
    """The LoRA/LoCon entry of factors up (out×k) and down (k×in·kh·kw) of a weight of `shape`, and its row."""
    module = LoRA.from_factors(up.to("cpu"), down.to("cpu"), shape)
    note = "locon" if math.prod(shape[2:]) > 1 else ""
    return module, ModuleReport(target.name, "lora", module.rank, parameter_count(module), quality.rel_error,
                                quality.energy_kept, note)
