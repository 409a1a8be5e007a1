"""Bake a LoRA / LyCORIS / diff file into a model checkpoint, streaming (`bake_lora`)."""
from .engine import bake_lora
from .index import BakeIndex

__all__ = ["bake_lora", "BakeIndex"]
