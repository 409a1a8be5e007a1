"""Load LoRA: a file from ComfyUI's `loras` folders as the pack's LoRA object, with what was detected."""
from __future__ import annotations

from merge_core.lora_file import load_lora

from .inputs import CATEGORY
from .pack_lora import LORA_TYPE, PackLora
from .runtime import file_signature, filename_list, model_file

PROFILES = ("auto", "sdxl", "peft", "kohya")


class LoadLora:
    NODE_ID = "LoRArSVD_Load"
    DISPLAY_NAME = "Load LoRA (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Reads a LoRA / LoCon / LoHa / LoKr / full-diff file (kohya, LyCORIS, diffusers or PEFT names) "
                   "from the loras folders, for merging, fusing, applying or saving. Shows the detected format, "
                   "architecture, module count and ranks.")
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_TOOLTIPS = ("the LoRA for the pack's nodes", "detected format, architecture, modules and ranks")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lora_name": (filename_list("loras"), {"tooltip": "a file in the loras folders"}),
            "profile": (list(PROFILES), {"default": "auto",
                                         "tooltip": "how to read module names: auto (SDXL when every module is a "
                                                    "known SDXL module, else kohya/peft names kept as they are)"}),
        }}

    @classmethod
    def IS_CHANGED(cls, lora_name: str, profile: str) -> str:
        return file_signature("loras", lora_name)

    def load(self, lora_name: str, profile: str) -> dict:
        pack = PackLora(load_lora(model_file("loras", lora_name), profile=profile), lora_name)
        info = pack.describe()
        return {"ui": {"text": [info]}, "result": (pack, info)}


NODES = (LoadLora,)
