"""What every adapter module shares: its weight shape, exact operator form, dense delta and extras.

A module's delta is reshaped to a matrix (out × in·kh·kw) for all linear algebra; `operator()` gives that
matrix exactly, as factors when the adapter is factored (scale folded into the left factor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch

from ..errors import FormatError
from ..files.narrow import narrowed
from ..lowrank.operators import Dense, Factored, Operator

F32 = torch.float32


def matrix_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in·kh·kw) of a weight of shape (out, in, kh, kw) or (out, in); a scalar is 1×1."""
    return (weight_shape[0], math.prod(weight_shape[1:])) if weight_shape else (1, 1)


def f32(t: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    return t.to(device=device if device is not None else t.device, dtype=F32)


def tucker_right(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Right factor of a Tucker (CP) conv: V[a,(i,k,l)] = Σ_b core[a,b,k,l]·down[b,i]."""
    return torch.einsum("abkl,bi->aikl", core, down.flatten(1)).reshape(core.shape[0], -1)


def alpha_value(t: Optional[torch.Tensor]) -> Optional[float]:
    if t is None:
        return None
    if t.numel() != 1:
        raise FormatError(f"alpha holds {t.numel()} values, not one")
    return float(t.reshape(-1)[0])


def scale_of(alpha: Optional[float], rank: int) -> float:
    """ComfyUI's rule: α/r, and 1.0 when there is no alpha key."""
    return 1.0 if alpha is None else alpha / rank


def finite_sum(*tensors: torch.Tensor) -> bool:
    """False when any tensor holds NaN or ±inf (their fp32 sum then does; 40× faster than isfinite().all())."""
    return math.isfinite(sum(float(t.sum(dtype=torch.float32)) for t in tensors))


def need(roles: dict[str, torch.Tensor], name: str, kind: str) -> torch.Tensor:
    if name not in roles:
        raise FormatError(f"{kind} module is missing its '{name}' tensor (has: {', '.join(sorted(roles))})")
    return roles[name]


def factor(roles: dict[str, torch.Tensor], name: str, kind: str) -> torch.Tensor:
    """need(), for a factor: a floating-point tensor of ≥ 2 dimensions, none of them empty (rank ≥ 1)."""
    t = need(roles, name, kind)
    if not t.is_floating_point() or t.dim() < 2 or 0 in t.shape:
        raise FormatError(f"{kind} factor '{name}' is {str(t.dtype).replace('torch.', '')} of shape "
                          f"{tuple(t.shape)}: a factor is a float matrix (or conv kernel) of rank ≥ 1")
    return t


def check_chain(kind: str, *pairs: tuple[str, torch.Tensor]) -> None:
    """Each named factor's rank side (its dim 1) meets the next one's (its dim 0): left @ right is defined."""
    for (a, left), (b, right) in zip(pairs, pairs[1:]):
        if left.shape[1] != right.shape[0]:
            raise FormatError(f"{kind} factors do not chain: '{a}' {tuple(left.shape)} with '{b}' "
                              f"{tuple(right.shape)}")


@dataclass
class Extras:
    """Tensors any module may carry besides its weight delta."""

    diff_b: Optional[torch.Tensor] = field(default=None, kw_only=True)  # bias delta
    dora_scale: Optional[torch.Tensor] = field(default=None, kw_only=True)  # DoRA magnitude (not linear)
    # the model's weight shape when the factors alone cannot tell it (LoHa/LoKr conv store flattened factors)
    shape_hint: Optional[tuple[int, ...]] = field(default=None, kw_only=True)

    @property
    def native_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape_hint if self.shape_hint is not None else self.native_shape

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.weight_shape)

    def to_dtype(self, dtype: torch.dtype, name: str = "module") -> "Extras":
        """A copy with every tensor cast to dtype (scalars such as alpha stay floats); a NonFiniteError naming
        module `name` when a value does not fit dtype."""
        cast = {f.name: narrowed(v, dtype, f"'{name}' ({f.name})") for f in fields(self)
                if isinstance(v := getattr(self, f.name), torch.Tensor)}
        return replace(self, **cast)

    def delta(self) -> torch.Tensor:
        """The dense ΔW in the weight's shape (fp32): for tests, baking and dense per-module methods."""
        return self.operator().dense().reshape(self.weight_shape)

    def is_finite(self) -> bool:
        """No NaN or ±inf in any of the module's tensors."""
        return finite_sum(*self.tensors().values())

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    @staticmethod
    def extras_from(roles: dict[str, torch.Tensor]) -> dict:
        """diff_b and dora_scale; a 1-D magnitude (PEFT's lora_magnitude_vector: one per output row) as the
        (out, 1) column kohya/LyCORIS write and ComfyUI reads."""
        scale = roles.get("dora_scale")
        return {"diff_b": roles.get("diff_b"), "dora_scale": scale[:, None] if scale is not None and scale.dim() == 1
                else scale}


__all__ = ["Dense", "Factored", "Operator", "Extras", "matrix_shape", "f32", "tucker_right", "alpha_value",
           "scale_of", "finite_sum", "need"]
