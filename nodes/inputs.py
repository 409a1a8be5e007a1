"""Input specs the node families share (LoRA slots with weights, the rank rule, device, seed), and reading
them back from a node's keyword arguments."""
from __future__ import annotations

from typing import Optional

from merge_core.lowrank import RankRule

from .pack_lora import LORA_TYPE, PackLora
from .runtime import DEVICE_TOOLTIP, DEVICES

CATEGORY = "LoRA rSVD Merge"
MAX_LORAS = 8
REQUIRED_LORAS = 2


def lora_slots(weight_tooltip: str) -> tuple[dict, dict]:
    """(required, optional) specs: lora_1, weight_1, lora_2, weight_2 required; lora_3..lora_8 optional."""
    required: dict = {}
    optional: dict = {}
    for i in range(1, MAX_LORAS + 1):
        target = required if i <= REQUIRED_LORAS else optional
        target[f"lora_{i}"] = (LORA_TYPE, {"tooltip": f"LoRA input {i}" + (" (optional)" if i > REQUIRED_LORAS
                                                                              else "")})
        target[f"weight_{i}"] = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                           "tooltip": weight_tooltip})
    return required, optional


def connected_loras(kwargs: dict) -> list[tuple[int, PackLora, float]]:
    """(slot, LoRA, weight) for every connected LoRA slot, in slot order."""
    out = []
    for i in range(1, MAX_LORAS + 1):
        lora = kwargs.get(f"lora_{i}")
        if lora is not None:
            out.append((i, lora, float(kwargs.get(f"weight_{i}", 1.0))))
    return out


def rank_inputs(energy: float = 0.99, min_rank: int = 4, max_rank: int = 32, rank: int = 0) -> dict:
    """rank (0 = dynamic), energy, min_rank, max_rank: the CLI's --rank/--energy/--min-rank/--max-rank."""
    return {
        "rank": ("INT", {"default": rank, "min": 0, "max": 4096,
                         "tooltip": "fixed rank per module; 0 = dynamic: the smallest rank keeping `energy` of "
                                    "the module's squared Frobenius norm, within [min_rank, max_rank]"}),
        "energy": ("FLOAT", {"default": energy, "min": 0.5, "max": 1.0, "step": 0.0001, "round": False,
                             "tooltip": "kept fraction of Σσ² for the dynamic rank (0.99 = 99 %)"}),
        "min_rank": ("INT", {"default": min_rank, "min": 1, "max": 4096, "tooltip": "dynamic rank lower bound"}),
        "max_rank": ("INT", {"default": max_rank, "min": 1, "max": 4096, "tooltip": "dynamic rank upper bound"}),
    }


def rank_rule(rank: int, energy: float, min_rank: int, max_rank: int, budget: Optional[int] = None) -> RankRule:
    """The rule the rank widgets describe; under a size budget only their bounds (the budget picks the ranks)."""
    return RankRule(rank if rank > 0 and budget is None else None, energy, min_rank, max_rank)


def budget_bytes(target_size_mb: float) -> Optional[int]:
    """target_size_mb in bytes (MB of 2²⁰ bytes); None when 0 (no size budget)."""
    return int(target_size_mb * 2**20) if target_size_mb > 0 else None


def device_input() -> dict:
    return {"device": (list(DEVICES), {"default": DEVICES[0], "tooltip": DEVICE_TOOLTIP})}


def seed_input(tooltip: str = "seed of every random choice (randomized SVD sketch, DARE masks): same seed, "
                              "same file") -> dict:
    # control_after_generate False: the frontend would otherwise add a "randomize" control to an INT named seed
    return {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                             "tooltip": tooltip})}


def dora_input() -> dict:
    return {"dora": (["error", "ignore"], {"default": "error",
                                           "tooltip": "DoRA inputs: error, or ignore their magnitude vector and "
                                                      "use only the low-rank part"})}


def target_size_input(note: str = "") -> dict:
    """target_size_mb: the CLI's --target-size, in MB of 2²⁰ bytes (0 = off)."""
    return {"target_size_mb": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 65536.0, "step": 0.1, "round": False,
        "tooltip": "0 = off; else a size budget: each module's rank is chosen (within min_rank..max_rank; rank and "
                   "energy are not used) to keep the most of the whole network's energy in an fp16 file of at most "
                   "this many MB (1 MB = 1,048,576 bytes, as Windows shows file sizes)" + note})}
