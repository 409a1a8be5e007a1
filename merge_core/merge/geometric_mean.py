"""geometric_mean: the seed's elementwise formula on the up and down factors, for N inputs.

With each input's factors Pᵢ, Qᵢ carrying its coefficient (factors.py: Pᵢ = sign(cᵢsᵢ)√|cᵢsᵢ|·upᵢ,
Qᵢ = √|cᵢsᵢ|·downᵢ, sᵢ = αᵢ/rᵢ):
    up = sign(Π Pᵢ) ⊙ |Π Pᵢ|^(1/N),   down = sign(Π Qᵢ) ⊙ |Π Qᵢ|^(1/N)   (elementwise; N = 2: the seed's √),
written with α = r.  So equal weights w give w·(the geometric mean); weights combine geometrically.
It needs equal factor shapes (same rank) in every input holding the module, and plain LoRA/LoCon factors.

Not gauge invariant: B·A = (B·M)(M⁻¹·A) for any invertible M, so two files with the same ΔW can give
different results; it is offered for comparison with the seed, not as a faithful merge (its error against
T = Σ wᵢΔWᵢ is in the report).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..adapters import LoRA
from ..errors import MergeCoreError, ShapeMismatchError
from ..lora_file import LoraSet, input_label
from ..lowrank import Factored, measure
from .factors import signed_split
from .options import MergeOptions
from .outcome import Outcome, combine_notes, lora_outcome
from .targets import ModuleTarget


def check_factor_shapes(targets: Sequence[ModuleTarget], sets: Sequence[LoraSet]) -> None:
    """Every input of every module must be a LoRA/LoCon of the same factor shapes; names the first that is not."""
    for target in targets:
        if target.vector_only:
            continue
        first = None
        for t in target.weighted:
            if not isinstance(t.module, LoRA):
                raise MergeCoreError(f"geometric_mean works on LoRA up/down factors; module '{target.name}' in "
                                     f"{input_label(sets[t.source], t.source)} is {t.module.kind}")
            shapes = (t.module.up.flatten(1).shape, (t.module.rank, target.matrix_shape[1]))
            if first is None:
                first = (t, shapes)
            elif shapes != first[1]:
                a, b = first[0], t
                raise ShapeMismatchError(
                    f"geometric_mean needs equal factor shapes: module '{target.name}' has rank {a.module.rank} in "
                    f"{input_label(sets[a.source], a.source)} but rank {b.module.rank} in {input_label(sets[b.source], b.source)}")


def signed_root_of_product(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sign(Π Fᵢ)·|Π Fᵢ|^(1/N), in the log domain (no under/overflow; any zero factor gives 0)."""
    sign = torch.ones_like(factors[0])
    log_mag = torch.zeros_like(factors[0])
    for f in factors:
        sign = sign * torch.sign(f)
        log_mag = log_mag + torch.log(f.abs())
    return sign * torch.exp(log_mag / len(factors))


def merge_geometric_mean(target: ModuleTarget, opts: MergeOptions, device: torch.device) -> Outcome:
    pairs = [p for p in (signed_split(t, device) for t in target.weighted) if p is not None]
    if len(pairs) < len(target.weighted):  # a zero coefficient zeroes the whole product
        return lora_outcome(target, None, None, measure(target.operator(device), None), device,
                            combine_notes("zero weight", target.note))
    up = signed_root_of_product([p for p, _ in pairs])
    down = signed_root_of_product([q for _, q in pairs])
    quality = measure(target.operator(device), Factored(up, down))
    return lora_outcome(target, up, down, quality, device, target.note)
