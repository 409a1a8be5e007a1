"""Key profiles: how module prefixes in a file become canonical module names, and back when writing.

- sdxl: every known SDXL alias (kohya ldm names, diffusion_model.*, text_encoders.*, diffusers and
  `.processor.` names, PEFT-diffusers) -> kohya names (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`); shapes
  are checked against the shipped SDXL table.  Written as kohya names.
- peft: module paths kept (`base_model.model.…`), `lora_A`/`lora_B`, alpha from adapter_config.json.
- kohya: prefixes kept as they are (SD1.5 and other kohya-style files), kohya suffixes; Wan Fun's
  `lora_unet__blocks_…` read as `lora_unet_blocks_…`, as ComfyUI reads them (comfy/lora_convert.py).
- custom: prefixes kept, the caller's up/down/alpha suffixes (the original merge_rsvd.py API).
- auto: sdxl when every module is a known SDXL module with the right shape (or a name ComfyUI maps for SDXL
  weights outside the LoRA table, e.g. `lora_unet_input_blocks_0_0` of an extracted LoRA); else peft/kohya.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import FormatError
from .sdxl_table import sdxl_aliases, sdxl_modules
from .suffixes import KOHYA, PEFT, Suffixes

PROFILES = ("auto", "sdxl", "peft", "kohya", "custom")
SD15_CONTEXT = 768  # cross-attention context width of SD1.x (SDXL: 2048)
# names ComfyUI maps for every SDXL weight outside the LoRA table (conv_in, norms, embeddings, text_projection):
# kept as they are, e.g. in extracted LoRAs and full diffs
SDXL_EXTRA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "text_encoders.clip_l.", "text_encoders.clip_g.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")  # kohya module names
# Wan Fun LoRAs name every module `lora_unet__<path>`; ComfyUI renames them all to `lora_unet_<path>` when a file
# holds this module (so a Wan Fun LoRA and a kohya Wan LoRA name one layer alike)
WAN_FUN_PREFIX, WAN_FUN_MARKER = "lora_unet__", "lora_unet__blocks_0_cross_attn_k"


@dataclass(frozen=True)
class Naming:
    """The outcome of reading a file's names: which profile, which architecture, name per prefix."""

    profile: str  # sdxl | peft | kohya | custom
    arch: str  # sdxl | sd15 | other
    names: dict[str, str]  # file prefix -> canonical module name

    @property
    def suffixes(self) -> Suffixes:
        return PEFT if self.profile == "peft" else KOHYA


def sdxl_names(shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, str], list[str], list[str]]:
    """(prefix -> kohya name, unknown prefixes, shape mismatch messages) against the SDXL table."""
    aliases, table = sdxl_aliases(), sdxl_modules()
    names, unknown, mismatched = {}, [], []
    for prefix, mshape in shapes.items():
        name = aliases.get(prefix)
        if name is None:
            unknown.append(prefix)
            continue
        if mshape is not None and tuple(mshape) != table[name].matrix_shape:
            mismatched.append(f"module '{prefix}' has shape {tuple(mshape)} but SDXL's {name} is "
                              f"{table[name].matrix_shape}")
        names[prefix] = name
    return names, unknown, mismatched


def kept_names(shapes: dict) -> dict[str, str]:
    """Each prefix as its own name, but a Wan Fun file's `lora_unet__…` as `lora_unet_…` (see WAN_FUN_PREFIX)."""
    if WAN_FUN_MARKER not in shapes:
        return {p: p for p in shapes}
    return {p: "lora_unet_" + p[len(WAN_FUN_PREFIX):] if p.startswith(WAN_FUN_PREFIX) else p for p in shapes}


def looks_sd15(shapes: dict[str, tuple[int, int]]) -> bool:
    """SD1.x: single text encoder (`lora_te_`) or cross-attention keys/values reading a 768-wide context."""
    for prefix, mshape in shapes.items():
        if prefix.startswith("lora_te_text_model"):
            return True
        if ("attn2_to_k" in prefix or "attn2.to_k" in prefix) and mshape is not None and mshape[1] == SD15_CONTEXT:
            return True
    return False


def resolve(shapes: dict[str, Optional[tuple[int, int]]], profile: str = "auto", style: str = "kohya",
            peft_dir: bool = False) -> Naming:
    """Canonical names for the module prefixes of one file (`shapes`: prefix -> matrix shape)."""
    if profile not in PROFILES:
        raise FormatError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    keep = kept_names(shapes)
    if profile == "peft":  # PEFT names modules by their path in the model, never as kohya does
        kohya = [p for p in shapes if p.startswith(KOHYA_PREFIXES)]
        if kohya:
            raise FormatError(f"profile peft reads PEFT adapters (lora_A/lora_B), but module '{kohya[0]}' has a "
                              "kohya name; read it with profile auto or kohya")
    if profile in ("peft", "custom", "kohya"):  # custom: the caller's names, exactly
        return Naming(profile, "sd15" if looks_sd15(shapes) else "other",
                      {p: p for p in shapes} if profile == "custom" else keep)
    names, unknown, mismatched = sdxl_names(shapes)
    extras = [p for p in unknown if p.startswith(SDXL_EXTRA_PREFIXES)]
    strange = [p for p in unknown if not p.startswith(SDXL_EXTRA_PREFIXES)]
    if profile == "sdxl":
        if strange:
            raise FormatError(f"not an SDXL module name: '{strange[0]}' ({len(strange)} of {len(shapes)} "
                              "modules unknown; try --profile auto)")
        if mismatched:
            raise FormatError(mismatched[0])
        return Naming("sdxl", "sdxl", {**names, **{p: p for p in extras}})
    if names and not strange and not mismatched and not looks_sd15(shapes):
        return Naming("sdxl", "sdxl", {**names, **{p: p for p in extras}})
    arch = "sd15" if looks_sd15(shapes) else "other"
    return Naming("peft" if (peft_dir or style == "peft") else "kohya", arch, keep)
