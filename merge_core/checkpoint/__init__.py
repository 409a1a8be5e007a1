"""Whole model checkpoints: weight sources, the SDXL/SD1.x/ComfyUI key layouts, and the LoRA names of
each tensor's delta (shared by extract and bake)."""
from .layout import Placement, is_checkpoint, placements
from .lora_names import BIAS, WEIGHT, Target, targets_of
from .sources import DictSource, WeightSource, open_weights

__all__ = ["Placement", "is_checkpoint", "placements", "BIAS", "WEIGHT", "Target", "targets_of", "DictSource",
           "WeightSource", "open_weights"]
