"""Read the weights of ComfyUI MODEL / CLIP objects as a merge_core WeightSource (keys/shape/get).

A MODEL is a ModelPatcher: a model plus the patches this clone adds (e.g. LoraLoader's).  The weight a
MODEL computes with is its clean weight with its own patches applied.  Clean weights come from
`get_key_patches()[key][0]`, which takes the backup when another clone has patched the shared model in place,
so no other clone's patches leak in (model.state_dict() may hold them).
"""
from __future__ import annotations

from typing import Iterable

import torch

MODEL_PREFIXES = ("diffusion_model.",)
CLIP_PREFIXES = ("clip_l.", "clip_g.")


class PatcherWeights:
    """A WeightSource over ModelPatchers: each weight as the patcher would compute with it, in fp32, read one
    at a time on `device` (keys are ComfyUI's: diffusion_model.*, clip_l.transformer.*, clip_g.transformer.*)."""

    def __init__(self, parts: Iterable[tuple[object, tuple[str, ...]]], device: torch.device):
        self.device = device
        self._entries: dict[str, list] = {}
        for patcher, prefixes in parts:
            for key, entry in patcher.get_key_patches().items():
                if key.startswith(prefixes):
                    self._entries[key] = entry

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][0][0].shape)

    def get(self, key: str) -> torch.Tensor:
        import comfy.lora

        (weight, convert), *patches = self._entries[key]
        w = convert(weight.to(self.device, torch.float32, copy=True), inplace=True)
        if patches:
            w = comfy.lora.calculate_weight(patches, w, key)
        return w


def model_weights(model, clip, device: torch.device) -> PatcherWeights:
    """The diffusion model's weights, and the text encoders' when a CLIP is given."""
    parts = [(model, MODEL_PREFIXES)]
    if clip is not None:
        parts.append((clip.patcher, CLIP_PREFIXES))
    return PatcherWeights(parts, device)
