"""The ComfyUI nodes of LoRA rSVD Merge: thin adapters over merge_core, one module per node family.

Every node class carries its id (NODE_ID, prefixed LoRArSVD_ so no built-in id is reused) and display name.
"""
from . import apply, bake, extract, fuse, load, lora_model, merge, report, resize, save

FAMILIES = (load, apply, merge, resize, fuse, extract, bake, save, report, lora_model)
NODE_CLASS_MAPPINGS = {cls.NODE_ID: cls for family in FAMILIES for cls in family.NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.NODE_ID: cls.DISPLAY_NAME for cls in NODE_CLASS_MAPPINGS.values()}
