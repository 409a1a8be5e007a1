"""Save LoRA: write the pack's LoRA under ComfyUI's output folder (default output/loras/, which ComfyUI lists
as a loras folder, so the file shows up in the stock LoraLoader at once); numbered, never overwriting."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from merge_core.files.metadata import carried_metadata, make_recipe
from merge_core.lora_file import save_lora

from .inputs import CATEGORY
from .pack_lora import LORA_TYPE, PackLora
from .runtime import relative_to_output, save_numbered

DTYPES = ("fp16", "bf16", "fp32")


def recipe_for(pack: PackLora, dtype: str) -> Optional[dict]:
    """The recipe written into the file: how the LoRA was made, plus the dtype it was saved in."""
    if pack.recipe:
        return {**pack.recipe, "parameters": {**pack.recipe.get("parameters", {}), "dtype": dtype}}
    if pack.lora.source is not None:
        return make_recipe("save", [pack.lora.source], {"dtype": dtype})
    return None


class SaveLora:
    NODE_ID = "LoRArSVD_Save"
    DISPLAY_NAME = "Save LoRA (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Writes the LoRA as a .safetensors file under the output folder as <prefix>_00001_.safetensors "
                   "(the next free number; never overwrites), with kohya/modelspec metadata and the recipe that "
                   "made it. The default prefix loras/... puts it where LoraLoader lists it.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("the written file, relative to the output folder",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lora": (LORA_TYPE, {"tooltip": "the LoRA to write"}),
            "filename_prefix": ("STRING", {"default": "loras/rsvd_merge",
                                           "tooltip": "path under the output folder, without the number and "
                                                      "extension; may not leave the output folder"}),
            "dtype": (list(DTYPES), {"default": "fp16", "tooltip": "tensor dtype in the file (alpha stays fp32)"}),
        }, "optional": {
            "title": ("STRING", {"default": "", "tooltip": "modelspec.title (default: the file name)"}),
        }}

    def save(self, lora: PackLora, filename_prefix: str, dtype: str, title: str = "") -> dict:
        recipe = recipe_for(lora, dtype)

        def write(path: Path) -> Path:
            return save_lora(lora.lora.modules, path, arch=lora.lora.arch, profile=lora.lora.profile, dtype=dtype,
                             overwrite=False, recipe=recipe, peft_config=lora.lora.peft_config, title=title or None,
                             carried=carried_metadata([lora.lora.metadata]))

        path = relative_to_output(save_numbered(filename_prefix, ".safetensors", write))
        return {"ui": {"text": [path]}, "result": (path,)}


NODES = (SaveLora,)
