"""merge_core: the pure library behind LoRA rSVD Merge (torch, safetensors, numpy and the stdlib only).

Read any common LoRA/LyCORIS file into one data model, do exact low-rank linear algebra on factors,
and write files ComfyUI, A1111/Forge and kohya load with no missing keys.
"""
__version__ = "0.1.0"

from .errors import MergeCoreError  # noqa: E402

__all__ = ["__version__", "MergeCoreError", "LoraSet", "load_lora", "save_lora"]


def __getattr__(name: str):
    """LoraSet, load_lora and save_lora on first use: importing the package (as `python -m merge_core` does
    before its first line) does not import torch, so Ctrl-C during that import is the CLI's one line too."""
    if name in ("LoraSet", "load_lora", "save_lora"):
        from . import lora_file
        return getattr(lora_file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
