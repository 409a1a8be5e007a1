"""Apply LoRA: patch a MODEL and CLIP with the pack's LoRA through ComfyUI's own LoRA loader, so a merge can
be previewed in a txt2img graph before it is saved."""
from __future__ import annotations

import torch

from merge_core.lora_file import state_dict_of

from .inputs import CATEGORY
from .pack_lora import LORA_TYPE, PackLora


def comfy_state_dict(pack: PackLora) -> dict[str, torch.Tensor]:
    """The LoRA as the flat fp32 state dict ComfyUI's loader reads (kohya names for SDXL)."""
    return state_dict_of(pack.lora.modules, pack.lora.naming.suffixes, torch.float32)


class ApplyLora:
    NODE_ID = "LoRArSVD_Apply"
    DISPLAY_NAME = "Apply LoRA (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies the pack's LoRA to a MODEL and CLIP exactly as LoraLoader applies a file "
                   "(comfy.sd.load_lora_for_models), e.g. to preview a merge before saving it.")
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("the patched diffusion model", "the patched CLIP model")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {
            "model": ("MODEL", {"tooltip": "the diffusion model to patch"}),
            "clip": ("CLIP", {"tooltip": "the CLIP model to patch"}),
            "lora": (LORA_TYPE, {"tooltip": "a LoRA from the pack's nodes"}),
            "strength_model": ("FLOAT", dict(strength, tooltip="how strongly to modify the diffusion model")),
            "strength_clip": ("FLOAT", dict(strength, tooltip="how strongly to modify the CLIP model")),
        }}

    def apply(self, model, clip, lora: PackLora, strength_model: float, strength_clip: float) -> tuple:
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        import comfy.sd

        return comfy.sd.load_lora_for_models(model, clip, comfy_state_dict(lora), strength_model, strength_clip)


NODES = (ApplyLora,)
