"""LoRA / LoCon: ΔW = (α/r)·up.flatten(1) @ down'.flatten(1), down' = down, or Σ_b mid[a,b]·down[b] (Tucker).

Linear: up [out,r], down [r,in].  Conv: up [out,r,1,1], down [r,in,kh,kw]; Tucker: down [r,in,1,1],
mid [r,r,kh,kw].  r = down.shape[0]; no alpha means scale 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Extras, Factored, alpha_value, check_chain, f32, factor, scale_of, tucker_right


@dataclass
class LoRA(Extras):
    up: torch.Tensor
    down: torch.Tensor
    alpha: Optional[float] = None
    mid: Optional[torch.Tensor] = None

    kind = "lora"

    @classmethod
    def from_roles(cls, roles: dict[str, torch.Tensor]) -> "LoRA":
        names = ["lora_up.weight"] + (["lora_mid.weight"] if "lora_mid.weight" in roles else []) + ["lora_down.weight"]
        parts = {n: factor(roles, n, "LoRA") for n in names}
        check_chain("LoRA", *parts.items())
        return cls(parts["lora_up.weight"], parts["lora_down.weight"], alpha_value(roles.get("alpha")),
                   parts.get("lora_mid.weight"), **cls.extras_from(roles))

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...], **extras) -> "LoRA":
        """Factors of the matrix form (up out×k, down k×in·kh·kw) -> a module of weight_shape, α = k."""
        k = down.shape[0]
        if len(weight_shape) > 2:
            up = up.reshape(weight_shape[0], k, *([1] * (len(weight_shape) - 2)))
            down = down.reshape(k, *weight_shape[1:])
        return cls(up.contiguous(), down.contiguous(), float(k), **extras)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank)

    @property
    def native_shape(self) -> tuple[int, ...]:
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        return (self.up.shape[0], *self.down.shape[1:])

    def operator(self, device: Optional[torch.device] = None) -> Factored:
        up = f32(self.up, device).flatten(1)
        down = f32(self.down, device)
        V = tucker_right(f32(self.mid, device), down) if self.mid is not None else down.flatten(1)
        return Factored(up * self.scale, V)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_up.weight": self.up, "lora_down.weight": self.down}
        if self.mid is not None:
            out["lora_mid.weight"] = self.mid
        if self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        return {**out, **self.extra_tensors()}
