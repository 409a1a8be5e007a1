"""Merging LoRAs (issue 3): rSVD with dynamic rank, and the conventional merges, on T = Σ wᵢΔWᵢ.

`merge_loras(sets, method, weights, rule, solver, seed, device, density, block_weights, dora, progress)`
returns a MergeResult (modules, per-module report, recipe).  METHODS lists the method names.
The original scripts' functions are in merge_core.merge.legacy_api.
"""
from .block_weights import BLOCKS_12, BLOCKS_20, parse_block_weights
from ..lora_file import DORA_CHOICES
from .engine import merge_loras
from .methods import METHODS, REGISTRY

__all__ = ["merge_loras", "METHODS", "REGISTRY", "DORA_CHOICES", "BLOCKS_20", "BLOCKS_12", "parse_block_weights"]
