"""One representation per adapter kind (one file each), built from a module's tensors by role name.

Roles are the kohya/LyCORIS suffixes without the leading dot: `lora_up.weight`, `lora_down.weight`,
`lora_mid.weight`, `alpha`, `hada_w1_a` … `hada_t2`, `lokr_w1` … `lokr_t2`, `diff`, `diff_b`, `dora_scale`.
Every other naming style is translated to these roles by `merge_core.keys.suffixes`.
"""
from __future__ import annotations

from typing import Union

import torch

from ..errors import FormatError
from .full import FullDiff
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA

AdapterModule = Union[LoRA, LoHa, LoKr, FullDiff]
FAMILIES = {"lora": "lora", "hada": "loha", "lokr": "lokr"}  # a role's prefix (before "_") -> its kind
KINDS = ("lora", "loha", "lokr", "full")


def module_from_roles(name: str, roles: dict[str, torch.Tensor]) -> AdapterModule:
    """The adapter for one module's tensors; a clear error naming the module if they fit no kind, or several."""
    kinds = sorted({FAMILIES[p] for p in {role.partition("_")[0] for role in roles} if p in FAMILIES}
                   | ({"full"} if "diff" in roles else set()))
    if len(kinds) > 1:
        raise FormatError(f"module '{name}' holds tensors of {len(kinds)} adapter kinds ({', '.join(kinds)}): "
                          "one would be used and the others dropped")
    try:
        if "lora_up.weight" in roles or "lora_down.weight" in roles:
            return LoRA.from_roles(roles)
        if any(r.startswith("hada_") for r in roles):
            return LoHa.from_roles(roles)
        if any(r.startswith("lokr_") for r in roles):
            return LoKr.from_roles(roles)
        if "diff" in roles or "diff_b" in roles:
            return FullDiff.from_roles(roles)
    except FormatError as exc:
        raise FormatError(f"module '{name}': {exc}") from None
    raise FormatError(f"module '{name}' has no weight tensors, only: {', '.join(sorted(roles))}")


def parameter_count(module: AdapterModule) -> int:
    return sum(t.numel() for k, t in module.tensors().items() if k != "alpha")


__all__ = ["AdapterModule", "KINDS", "LoRA", "LoHa", "LoKr", "FullDiff", "module_from_roles", "parameter_count"]
