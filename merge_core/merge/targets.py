"""What each merged module is made of: the inputs that hold it, their coefficients, and T = Σ cᵢ ΔWᵢ.

cᵢ = wᵢ·bᵢ, the source's weight times its SDXL block weight for the module's block.  A module present in
only some inputs is made of those (the others contribute ΔW = 0).  Every compatibility check (common
architecture, equal shapes per module) runs over all modules before any arithmetic, so a bad pair of
inputs fails at once, naming a module.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch

from ..adapters import AdapterModule
from ..adapters.base import matrix_shape
from ..errors import MergeCoreError, ShapeMismatchError
from ..keys.sdxl_table import sdxl_aliases
from ..lora_file import LoraSet, input_label
from ..lowrank import Operator, weighted_sum
from .block_weights import BlockWeights, block_multiplier


@dataclass(frozen=True)
class Term:
    source: int
    coeff: float
    module: AdapterModule

    @property
    def has_weight(self) -> bool:
        """False for a full diff that carries only a bias delta."""
        return getattr(self.module, "has_weight", True)


@dataclass(frozen=True)
class ModuleTarget:
    name: str
    weight_shape: tuple[int, ...]
    terms: tuple[Term, ...]
    of_inputs: int  # how many inputs were merged (for the "in k of N" note)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.weight_shape)

    @cached_property
    def weighted(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.has_weight)

    @cached_property
    def vector_only(self) -> bool:
        """Nothing to factor: only bias deltas, or 1-D diffs (norm weights)."""
        return not self.weighted or len(self.weight_shape) < 2

    @property
    def note(self) -> str:
        k = len(self.terms)
        return f"in {k} of {self.of_inputs} inputs" if k < self.of_inputs else ""

    def operator(self, device: torch.device) -> Operator:
        """T = Σ cᵢ ΔWᵢ exactly: stacked factors when every input is factored, else one dense matrix."""
        return weighted_sum([(t.coeff, t.module.operator(device)) for t in self.weighted])

    def non_finite_term(self) -> Optional[Term]:
        """The first input whose tensors for this module hold NaN or ±inf (a full scan: for failed modules)."""
        return next((t for t in self.terms if not t.module.is_finite()), None)

    @property
    def bias_shape(self) -> Optional[tuple[int, ...]]:
        """The shape of the summed bias delta, None when no input carries one."""
        return next((tuple(t.module.diff_b.shape) for t in self.terms if t.module.diff_b is not None), None)

    def bias(self, device: torch.device) -> Optional[torch.Tensor]:
        """Σ cᵢ·diff_bᵢ over the inputs that carry a bias delta."""
        parts = [t.coeff * t.module.diff_b.to(device=device, dtype=torch.float32)
                 for t in self.terms if t.module.diff_b is not None]
        return sum(parts) if parts else None


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def check_architectures(sets: Sequence[LoraSet]) -> None:
    """SD1.5 with SDXL (or any two families whose modules cannot line up) is refused, naming a module."""
    sdxl = next((i for i, s in enumerate(sets) if s.arch == "sdxl"), None)
    other = next((i for i, s in enumerate(sets) if s.arch == "sd15"), None)
    if sdxl is None or other is None:
        return
    a, b = sets[other], sets[sdxl]
    aliases = sdxl_aliases()
    for name, module in a.modules.items():
        twin = aliases.get(name)
        if twin in b.modules and module.matrix_shape != b.modules[twin].matrix_shape:
            raise ShapeMismatchError(
                f"module '{twin}' is {_shape_text(b.modules[twin].matrix_shape)} in {input_label(b, sdxl)} (SDXL) but "
                f"{_shape_text(module.matrix_shape)} in {input_label(a, other)} (SD1.5, as '{name}'): "
                "SD1.5 and SDXL LoRAs cannot be merged")
    first = next(iter(a.modules))
    raise ShapeMismatchError(f"module '{first}' of {input_label(a, other)} is an SD1.5 module with no SDXL counterpart in "
                             f"{input_label(b, sdxl)}: SD1.5 and SDXL LoRAs cannot be merged")


def _weight_shape(name: str, present: Sequence[tuple[int, AdapterModule]], sets: Sequence[LoraSet]) -> tuple[int, ...]:
    """The module's weight shape, the same matrix shape in every input (or a ShapeMismatchError)."""
    shaped = [(i, m) for i, m in present if getattr(m, "has_weight", True)]
    if not shaped:
        return ()
    i0, m0 = shaped[0]
    for i, m in shaped[1:]:
        if m.matrix_shape != m0.matrix_shape:
            raise ShapeMismatchError(
                f"module '{name}' is {_shape_text(m0.weight_shape)} in {input_label(sets[i0], i0)} but "
                f"{_shape_text(m.weight_shape)} in {input_label(sets[i], i)}")
    return max((m.weight_shape for _, m in shaped), key=len)  # a conv's 4-D shape over a flattened one


def plan_targets(sets: Sequence[LoraSet], weights: Sequence[float],
                 block_weights: Optional[Sequence[Optional[BlockWeights]]] = None) -> list[ModuleTarget]:
    """Every module of any input (first-seen order) with its terms; all checks before any arithmetic."""
    if block_weights is not None and len(block_weights) != len(sets):
        raise MergeCoreError(f"number of block-weight lists ({len(block_weights)}) must match number of "
                             f"inputs ({len(sets)})")
    check_architectures(sets)
    multipliers = []
    for i, s in enumerate(sets):
        values = block_weights[i] if block_weights is not None else None
        multipliers.append(block_multiplier(values, s.arch, s.modules, input_label(s, i)))
    names = dict.fromkeys(name for s in sets for name in s.modules)
    targets = []
    for name in names:
        present = [(i, s.modules[name]) for i, s in enumerate(sets) if name in s.modules]
        shape = _weight_shape(name, present, sets)
        terms = tuple(Term(i, float(weights[i]) * multipliers[i](name), m) for i, m in present)
        targets.append(ModuleTarget(name, shape, terms, len(sets)))
    return targets
