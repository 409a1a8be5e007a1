"""LoRA module names for checkpoint tensors: what the extracted file calls each delta, and what a bake looks up.

Names (every one is a key of ComfyUI's LoRA key map, so ComfyUI loads the file with no missing keys):
- UNet `diffusion_model.<path>.weight|bias` -> `lora_unet_<path with _>` (`.diff_b` for the bias).  This is the
  kohya name for every module of the SDXL LoRA/LoCon table, and ComfyUI maps it for every other UNet weight
  too (norms, conv_in, time_embed, label_emb, out).  A Z-Image path in diffusers' spelling (a Tongyi
  diffusers-format transformer: `layers.0.attention.to_q`, a third of ComfyUI's fused `attention.qkv`) has no
  kohya name ComfyUI maps: it keeps `diffusion_model.<path>`, which ComfyUI maps onto its part of the weight.
- Text encoders, the six LoRA layers of each block (q/k/v/out_proj, fc1, fc2) -> kohya
  `lora_te1_text_model_encoder_layers_N_self_attn_q_proj` (SDXL CLIP-L), `lora_te2_…` (SDXL OpenCLIP-G, after the
  q/k/v split), `lora_te_…` (SD1.x); `text_projection` -> `lora_te1_/lora_te2_text_projection`.
- Other text-encoder weights (layer norms, embeddings, final norm) have no kohya name ComfyUI maps, so they get
  ComfyUI's generic name `text_encoders.clip_l.transformer.text_model.<path>`.
- Generic state dicts (no SD/SDXL layout, e.g. an LLM): the key path itself without `.weight`/`.bias`
  (`model.layers.0.self_attn.q_proj`), written with kohya suffixes (`.lora_up.weight`, `.diff`, `.diff_b`).  Dotted
  names keep the exact key, so a bake maps them back without guessing, and `load_lora(profile="kohya")` keeps
  them as they are.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..keys.flux_names import flux_place
from ..keys.zimage_names import zimage_place
from .layout import FLUX_DIFFUSERS, TE, TE1, TE2, UNET, Placement, placements

WEIGHT, BIAS = "weight", "bias"
GENERIC = "other"
KOHYA_TE = {TE1: "lora_te1_", TE2: "lora_te2_", TE: "lora_te_"}
CLIP_LORA_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "mlp.fc1", "mlp.fc2")
ENCODER_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Target:
    """One LoRA module entry a checkpoint tensor's delta goes to: `name` (module) and `role` (weight/bias)."""

    name: str
    role: str  # weight -> LoRA / .diff;  bias -> .diff_b
    placement: Placement
    loadable: bool = True  # ComfyUI's LoRA key map places it (False: a bake can, an extract leaves it out)

    @property
    def group(self) -> str:
        return self.placement.group

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.placement.take(tensor)

    def part_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of what `take` selects from a tensor of `shape` (row block / transpose applied)."""
        return tuple(self.take(torch.empty(shape, device="meta")).shape)


def split_role(key: str) -> tuple[str, str]:
    """(module path, role): `x.weight` -> (x, weight), `x.bias` -> (x, bias), anything else -> (key, weight)."""
    for suffix, role in ((".weight", WEIGHT), (".bias", BIAS)):
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return key, WEIGHT


def comfy_name(p: Placement) -> Optional[tuple[str, str]]:
    """(module name, role) for a ComfyUI key, or None when ComfyUI has no LoRA name for it."""
    stem, role = split_role(p.comfy_key)
    if p.group == UNET:
        if stem == p.comfy_key:  # a parameter with no .weight/.bias: ComfyUI's generic name is the key
            return p.comfy_key, WEIGHT
        if zimage_place(stem) is not None:  # Z-Image's diffusers spelling (see the module docstring)
            return stem, role
        return "lora_unet_" + stem[len("diffusion_model."):].replace(".", "_"), role
    if stem == p.comfy_key:
        return None
    inner = stem.split(".transformer.", 1)[1]
    m = ENCODER_LAYER.fullmatch(inner)
    if m and m.group(2) in CLIP_LORA_LAYERS:
        return f"{KOHYA_TE[p.group]}text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}", role
    if inner == "text_projection" and p.group in (TE1, TE2):
        return f"{KOHYA_TE[p.group]}text_projection", role
    return f"text_encoders.{stem}", role


def targets_of(key: str, shape: tuple[int, ...], checkpoint: bool, prefix: str = "") -> list[Target]:
    """Where the delta of `key` goes in a LoRA file ([] = nowhere).  `checkpoint`: the source is in an
    understood SD/SDXL layout (then keys outside it are skipped); otherwise every key is named generically.
    `prefix`: the source's (layout.source_layout), put before the key to place it."""
    if prefix == FLUX_DIFFUSERS:
        return flux_diffusers_targets(key)
    found = placements(prefix + key, shape)
    if found is None:
        if checkpoint:
            return []
        stem, role = split_role(key)
        return [Target(stem, role, Placement(key, GENERIC))]
    out = []
    for p in found:
        named = comfy_name(p)
        if named is not None:
            out.append(Target(named[0], named[1], p))
    return out


def flux_diffusers_targets(key: str) -> list[Target]:
    """A diffusers-format Flux key: `transformer.<path>`, which ComfyUI maps onto its BFL weight or a row block of
    it.  Not loadable in ComfyUI: the bias of a part of a fused weight (q, k, v, proj_mlp) or of the half-swapped
    norm_out, which its key map cannot place (the `.diff_b` of a sliced name loads, and patches nothing)."""
    stem, role = split_role(key)
    place = flux_place(FLUX_DIFFUSERS + stem)
    sliced = role == BIAS and place is not None and (place.part is not None or place.swap)
    return [Target(FLUX_DIFFUSERS + stem, role, Placement(FLUX_DIFFUSERS + key, UNET), loadable=not sliced)]
