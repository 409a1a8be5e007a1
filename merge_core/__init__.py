"""merge_core: the pure library behind LoRA rSVD Merge (torch, safetensors, numpy and the stdlib only).

Read any common LoRA/LyCORIS file into one data model, do exact low-rank linear algebra on factors,
and write files ComfyUI, A1111/Forge and kohya load with no missing keys.
"""
__version__ = "0.1.0"

from .errors import MergeCoreError  # noqa: E402
from .lora_file import LoraSet, load_lora, save_lora  # noqa: E402

__all__ = ["__version__", "MergeCoreError", "LoraSet", "load_lora", "save_lora"]
