"""Merge LoRAs: the rSVD merge (T = Σ wᵢ ΔWᵢ, exact factor stacking then a seeded randomized SVD with an
energy-chosen rank) and the conventional methods (concat, geometric mean, SVD, weighted average, TIES, DARE,
DARE-TIES)."""
from __future__ import annotations

from typing import Optional

from merge_core.merge import METHODS, BlockWeights, merge_loras, parse_block_weights

from .inputs import (CATEGORY, budget_bytes, connected_loras, device_input, dora_input, lora_slots, rank_inputs,
                     rank_rule, seed_input, target_size_input)
from .pack_lora import LORA_TYPE, PackLora, summary_line
from .runtime import run_job, torch_device

CONVENTIONAL = tuple(m for m in METHODS if m != "rsvd")
WEIGHT_TOOLTIP = "weight wᵢ of this LoRA in T = Σ wᵢ ΔWᵢ (the strength you would give it in LoraLoader)"
BLOCK_WEIGHTS_TOOLTIP = ("optional block weights, one line per LoRA input in slot order (line 1 = lora_1). SDXL: "
                         "20 comma-separated values (BASE, IN00-IN08, MID, OUT00-OUT08) or the 12-value short form; "
                         "Flux.1: 58 values (BASE, D00-D18, S00-S37; BASE = text encoders and the layers outside "
                         "the blocks); or BLOCK=VALUE pairs, the rest 1 (IN=0, OUT00-OUT02=0.5 or D=0.5, S20-S37=0); "
                         "an empty line = all 1")


def block_weights_input() -> dict:
    return {"block_weights": ("STRING", {"default": "", "multiline": True, "tooltip": BLOCK_WEIGHTS_TOOLTIP})}


def block_weight_lines(text: str, slots: list[int]) -> Optional[list[Optional[BlockWeights]]]:
    """The block weights of each connected slot (line i for lora_i; None where empty), None when none given."""
    lines = text.splitlines()
    picked = [parse_block_weights(lines[i - 1]) if i <= len(lines) else None for i in slots]
    return picked if any(p is not None for p in picked) else None


def run_merge(method: str, slots: dict, rank: int, energy: float, min_rank: int, max_rank: int, seed: int,
              device: str, dora: str, density: float = 0.5, block_weights: str = "",
              target_size_mb: float = 0.0, label: str = "merge") -> dict:
    """The merge of the connected slots, as a node's return value (the pack's report is titled `label`)."""
    inputs = connected_loras(slots)
    size = budget_bytes(target_size_mb)
    rule = rank_rule(rank, energy, min_rank, max_rank, size)
    bw = block_weight_lines(block_weights, [i for i, _, _ in inputs])
    result = run_job(lambda progress: merge_loras(
        [lora.lora for _, lora, _ in inputs], method=method, weights=[w for _, _, w in inputs], rule=rule,
        seed=seed, device=torch_device(device), density=density, block_weights=bw, dora=dora, progress=progress,
        target_size=size))
    pack = PackLora.from_result(result, f"{label} ({method})")
    return {"ui": {"text": [summary_line(result.report)]}, "result": (pack,)}


class RsvdMerge:
    NODE_ID = "LoRArSVD_Merge"
    DISPLAY_NAME = "rSVD Merge LoRAs"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Merges 2-8 LoRAs into one: per module T = Σ wᵢ ΔWᵢ, stacked exactly in factor form (no dense "
                   "matrix), then a seeded randomized SVD keeps the smallest rank holding `energy` of ‖T‖² "
                   "(or a fixed rank). Same result as stacking the LoRAs at these strengths, up to the kept energy. "
                   "Optional SDXL or Flux.1 block weights per input.")
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("the merged LoRA, with its per-module report",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required, optional = lora_slots(weight_tooltip=WEIGHT_TOOLTIP)
        required.update({**rank_inputs(), **seed_input(), **device_input(), **dora_input()})
        optional.update({**target_size_input(), **block_weights_input()})  # optional, last: older workflows load
        return {"required": required, "optional": optional}

    def merge(self, rank: int, energy: float, min_rank: int, max_rank: int, seed: int, device: str, dora: str,
              target_size_mb: float = 0.0, block_weights: str = "", **slots) -> dict:
        return run_merge("rsvd", slots, rank, energy, min_rank, max_rank, seed, device, dora,
                         block_weights=block_weights, target_size_mb=target_size_mb)


class ConventionalMerge:
    NODE_ID = "LoRArSVD_MergeConventional"
    DISPLAY_NAME = "Merge LoRAs (conventional)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Merges 2-8 LoRAs with a conventional method: concat (exact, rank Σrᵢ), geometric mean "
                   "(of raw factors, equal shapes only), SVD (exact truncated SVD of the weighted sum, from the "
                   "factors), weighted average, TIES, DARE or DARE-TIES (density = kept fraction). Optional SDXL or "
                   "Flux.1 block weights per input.")
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("the merged LoRA, with its per-module report",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required, optional = lora_slots(weight_tooltip=WEIGHT_TOOLTIP)
        required.update({
            "method": (list(CONVENTIONAL), {"default": CONVENTIONAL[0], "tooltip": "the merge method"}),
            "density": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "TIES / DARE: fraction of entries kept"}),
            **rank_inputs(), **seed_input(), **device_input(), **dora_input(), **block_weights_input(),
        })
        optional.update(target_size_input("; not for concat or geometric_mean"))
        return {"required": required, "optional": optional}

    def merge(self, method: str, density: float, rank: int, energy: float, min_rank: int, max_rank: int,
              seed: int, device: str, dora: str, block_weights: str, target_size_mb: float = 0.0,
              **slots) -> dict:
        return run_merge(method, slots, rank, energy, min_rank, max_rank, seed, device, dora, density,
                         block_weights, target_size_mb)


NODES = (RsvdMerge, ConventionalMerge)
