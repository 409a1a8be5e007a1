"""A small model ComfyUI builds itself from a unet config (weights zeroed, so a patched weight is the ΔW
ComfyUI applies), and the weights ComfyUI computes for it after LoraLoader's loading of LoRA files: how a
test sees exactly what a LoRA does in a real ComfyUI, fused-weight slices and all."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file

CPU = torch.device("cpu")


def tiny_model(config: dict, class_name: str):
    """(ModelPatcher, LoRA key map from model_lora_keys_unet) of ComfyUI's model for the unet `config`, on the
    CPU in fp32, weights zeroed; its supported-model class must be `class_name`."""
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(dict(config, dtype=torch.float32))
    assert type(model_config).__name__ == class_name
    model = model_config.get_model({}, device=CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    key_map = {}
    comfy.lora.model_lora_keys_unet(model, key_map)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU), key_map


def applied(patcher, loras: Iterable[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """The weight ComfyUI computes for every patched key after LoraLoader's load_lora_for_models of each
    (file, strength) in turn, on the zeroed model."""
    import comfy.lora
    import comfy.sd

    for path, strength in loras:
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, load_file(str(path)), strength, 0)
    weights = patcher.model.state_dict()
    return {key: comfy.lora.calculate_weight(patches, torch.zeros_like(weights[key]), key)
            for key, patches in patcher.patches.items()}
