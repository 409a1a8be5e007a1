"""Converters between the pack's LoRA and ComfyUI's built-in LORA_MODEL type.

LORA_MODEL (comfy_extras/nodes_train.py: TrainLoraNode's output, LoraModelLoader's and SaveLoRA's input) is a
dict `<module path in the model>.<adapter tensor name>` -> tensor, e.g.
`diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_up.weight`, `...alpha`, LoHa
`...hada_w1_a`, LoKr `...lokr_w1`, plus `.diff` / `.diff_b` entries for norm weights and biases.  It patches
the diffusion model only (LoraModelLoader passes no CLIP).
"""
from __future__ import annotations

import torch

from merge_core.errors import MergeCoreError
from merge_core.keys.sdxl_table import sdxl_aliases, sdxl_modules
from merge_core.keys.suffixes import group_keys
from merge_core.lora_file import LoraSet, lora_set_from

from .inputs import CATEGORY
from .pack_lora import LORA_TYPE, PackLora

LORA_MODEL = "LORA_MODEL"
LABEL = "LORA_MODEL input"


class TensorDict:
    """An in-memory state dict as the tensor source lora_set_from reads (keys/get/items/len/metadata)."""

    metadata: dict = {}

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = {k: v.detach().to("cpu") for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def items(self):
        return self._tensors.items()

    def __len__(self) -> int:
        return len(self._tensors)


def _read(tensors: dict[str, torch.Tensor], profile: str) -> LoraSet:
    lset = lora_set_from(TensorDict(tensors), LABEL, profile)
    lset.source = None
    return lset


def from_lora_model(lora_model: dict) -> tuple[LoraSet, int]:
    """(LoraSet, number of tensors left out).  A trained SDXL LORA_MODEL also patches layers no SDXL LoRA file
    names (norms, biases-only, time embedding, conv_in/out): those are left out so the result has kohya SDXL
    names and merges with SDXL LoRA files; any other model's LORA_MODEL is kept whole, names as they are."""
    if not lora_model:
        raise MergeCoreError("the LORA_MODEL input is empty")
    whole = _read(lora_model, "auto")
    if whole.arch == "sdxl":
        return whole, 0
    groups, _ = group_keys(lora_model.keys())
    aliases = sdxl_aliases()
    keep = {key for prefix, roles in groups.items() if prefix in aliases for key in roles.values()}
    if not keep:
        return whole, 0
    try:
        sdxl = _read({k: v for k, v in lora_model.items() if k in keep}, "sdxl")
    except MergeCoreError:  # SDXL-like names with other shapes: not an SDXL model
        return whole, 0
    return sdxl, len(lora_model) - len(keep)


def to_lora_model(pack: PackLora) -> tuple[dict[str, torch.Tensor], int]:
    """(LORA_MODEL dict in fp32, number of text-encoder modules left out)."""
    table = sdxl_modules() if pack.lora.arch == "sdxl" else {}
    out: dict[str, torch.Tensor] = {}
    skipped = 0
    for name, module in pack.lora.modules.items():
        spec = table.get(name)
        if (spec is not None and spec.group != "unet") or name.startswith("lora_te"):
            skipped += 1
            continue
        prefix = spec.key[: -len(".weight")] if spec is not None else name
        for role, tensor in module.tensors().items():
            out[f"{prefix}.{role}"] = tensor.detach().to("cpu", torch.float32)
    if not out:
        raise MergeCoreError(f"{pack.label} has no diffusion-model modules; a LORA_MODEL patches the diffusion "
                             "model only")
    return out, skipped


class LoraToLoraModel:
    NODE_ID = "LoRArSVD_ToLoraModel"
    DISPLAY_NAME = "LoRA to LORA_MODEL (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Converts the pack's LoRA to ComfyUI's LORA_MODEL (for Load LoRA Model / Save LoRA Weights "
                   "and training from an existing LoRA). LORA_MODEL patches the diffusion model only: text-encoder "
                   "modules are left out.")
    RETURN_TYPES = (LORA_MODEL, "STRING")
    RETURN_NAMES = ("lora_model", "info")
    OUTPUT_TOOLTIPS = ("the diffusion-model part as a LORA_MODEL (fp32)", "what was converted")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"lora": (LORA_TYPE, {"tooltip": "a LoRA from the pack's nodes"})}}

    def convert(self, lora: PackLora) -> tuple:
        lora_model, skipped = to_lora_model(lora)
        info = (f"{len(lora.lora.modules) - skipped} diffusion-model modules converted"
                + (f", {skipped} text-encoder modules left out" if skipped else ""))
        return (lora_model, info)


class LoraModelToLora:
    NODE_ID = "LoRArSVD_FromLoraModel"
    DISPLAY_NAME = "LORA_MODEL to LoRA (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Converts ComfyUI's LORA_MODEL (e.g. from Train LoRA) to the pack's LoRA, to merge, fuse, "
                   "report or save it. For SDXL, layers no SDXL LoRA file names (norms, time embedding, ...) are "
                   "left out so the result has standard kohya names.")
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_TOOLTIPS = ("the LoRA for the pack's nodes", "detected format, architecture, modules and ranks")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"lora_model": (LORA_MODEL, {"tooltip": "a LORA_MODEL, e.g. from Train LoRA"})}}

    def convert(self, lora_model: dict) -> tuple:
        lset, dropped = from_lora_model(lora_model)
        pack = PackLora(lset, LABEL)
        info = pack.describe() + (f"\nleft out: {dropped} tensors of layers outside the SDXL LoRA table"
                                  if dropped else "")
        return (pack, info)


NODES = (LoraToLoraModel, LoraModelToLora)
