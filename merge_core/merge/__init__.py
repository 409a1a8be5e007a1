"""Merging LoRAs (issue 3): rSVD with dynamic rank, and the conventional merges, on T = Σ wᵢΔWᵢ.

`merge_loras(sets, method, weights, rule, solver, seed, device, density, block_weights, dora, progress)`
returns a MergeResult (modules, per-module report, recipe).  METHODS lists the method names.
`plan_merge(...)` then `merge_to_file(plan, path, ...)` writes the result module by module as it is made.
The original scripts' functions are in merge_core.merge.legacy_api.
"""
from .block_weights import BLOCKS_12, BLOCKS_20, FLUX_BLOCKS, BlockWeights, parse_block_weights
from ..lora_file import DORA_CHOICES
from .api import merge_loras
from .engine import plan_merge
from .methods import METHODS, REGISTRY
from .to_file import merge_to_file

__all__ = ["merge_loras", "plan_merge", "merge_to_file", "METHODS", "REGISTRY", "DORA_CHOICES", "BLOCKS_20",
           "BLOCKS_12", "FLUX_BLOCKS", "BlockWeights", "parse_block_weights"]
