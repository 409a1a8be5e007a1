"""Fusion of several LoKr/LoHa/LoRA models (issue 4): five strategies on the exact deltas, three output forms.

`fuse_models(sets, weights, strategy, norm_threshold, output_format, rule, device, dora, progress)` returns a
MergeResult; `verify_written` reloads a written file and measures it against the exact fused target.
"""
from ..lora_file import DORA_CHOICES
from .engine import DEFAULT_RULE, fuse_models
from .output_forms import AUTO_LOKR_ENERGY, OUTPUT_FORMATS
from .strategies import STRATEGIES
from .verify import fusion_metadata, verify_written

__all__ = ["fuse_models", "verify_written", "fusion_metadata", "STRATEGIES", "OUTPUT_FORMATS", "AUTO_LOKR_ENERGY",
           "DEFAULT_RULE", "DORA_CHOICES"]
