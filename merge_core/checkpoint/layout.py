"""Where a checkpoint tensor lives in ComfyUI's model: checkpoint keys -> ComfyUI state-dict keys.

Understood layouts (per key, by prefix):
- SDXL / SD1.x original checkpoints: UNet `model.diffusion_model.*`; TE1 (CLIP-L, Hugging Face layout)
  `conditioner.embedders.0.transformer.text_model.*`; SD1.x text encoder `cond_stage_model.transformer.text_model.*`;
  TE2 (OpenCLIP ViT-bigG) `conditioner.embedders.1.model.*`, converted as ComfyUI converts it on load:
  `transformer.resblocks.N.attn.in_proj_weight` [3·d, d] is q/k/v stacked (rows split in three),
  `attn.out_proj` -> `self_attn.out_proj`, `mlp.c_fc` -> `mlp.fc1`, `mlp.c_proj` -> `mlp.fc2`, `ln_1/ln_2` ->
  `layer_norm1/2`, `positional_embedding`/`token_embedding`/`ln_final` -> embeddings / final_layer_norm, and
  `text_projection` (used as x @ P) -> the Linear weight Pᵀ (transposed).
- ComfyUI-internal keys (what ModelPatcher holds): `diffusion_model.*`, `clip_l.transformer.*`, `clip_g.transformer.*`.
- A diffusion model saved on its own, as ComfyUI's models/diffusion_models/ folder holds them (Flux as BFL ships
  it, `double_blocks.0.img_attn.qkv.weight`; Z-Image, Wan, Qwen-Image, SD3, … as Comfy-Org repackages them; a
  bare SDXL UNet): ComfyUI holds every key under `diffusion_model.` (`source_layout`).
- A Flux transformer in diffusers' format (`transformer_blocks.0.attn.to_q.weight`, which ComfyUI's loader reads):
  its keys are named under `transformer.` (FLUX_DIFFUSERS), the names ComfyUI's LoRA key map gives them.

`placements(key, shape)` is None for a key in no understood layout (a generic state dict), and [] for a key
of an understood checkpoint that no LoRA can patch (VAE, `logit_scale`, position ids, EMA copies, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

UNET = "unet"
TE1 = "te1"  # CLIP-L of SDXL (kohya lora_te1_)
TE2 = "te2"  # OpenCLIP-G of SDXL (kohya lora_te2_)
TE = "te"  # the single CLIP-L of SD1.x (kohya lora_te_)

# prefix -> (ComfyUI prefix, group), for layouts that only need a prefix swap
RENAMES: tuple[tuple[str, str, str], ...] = (
    ("model.diffusion_model.", "diffusion_model.", UNET),
    ("diffusion_model.", "diffusion_model.", UNET),
    ("conditioner.embedders.0.transformer.text_model.", "clip_l.transformer.text_model.", TE1),
    ("cond_stage_model.transformer.text_model.", "clip_l.transformer.text_model.", TE),
    ("clip_l.transformer.", "clip_l.transformer.", TE1),
    ("clip_g.transformer.", "clip_g.transformer.", TE2),
)
OPENCLIP = "conditioner.embedders.1.model."
OPENCLIP_COMFY = "clip_g.transformer."
# known checkpoint parts with nothing a LoRA can patch (a key under them gets no placement)
OTHER_PARTS = ("first_stage_model.", "conditioner.", "cond_stage_model.", "model_ema.", "denoiser.", "clip_l.",
               "clip_g.")

OPENCLIP_TOP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}
RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@dataclass(frozen=True)
class Placement:
    """The ComfyUI key a checkpoint tensor (or a row block of it) becomes, and how."""

    comfy_key: str
    group: str  # unet | te1 | te2 | te
    rows: Optional[tuple[int, int]] = None  # row block [start, end) of the checkpoint tensor
    transpose: bool = False  # the ComfyUI weight is the transpose of the checkpoint tensor

    def take(self, tensor):
        """The part of a checkpoint tensor (or of its delta) that this placement patches."""
        t = tensor if self.rows is None else tensor[self.rows[0]:self.rows[1]]
        return t.T if self.transpose else t


def _openclip(rest: str, shape: tuple[int, ...]) -> list[Placement]:
    if rest in OPENCLIP_TOP:
        return [Placement(OPENCLIP_COMFY + OPENCLIP_TOP[rest], TE2)]
    if rest == "text_projection":
        return [Placement(OPENCLIP_COMFY + "text_projection.weight", TE2, transpose=True)]
    m = IN_PROJ.fullmatch(rest)
    if m:
        layer, role = m.groups()
        d = shape[0] // 3
        return [Placement(f"{OPENCLIP_COMFY}text_model.encoder.layers.{layer}.{p}.{role}", TE2, (i * d, (i + 1) * d))
                for i, p in enumerate(QKV)]
    m = RESBLOCK.fullmatch(rest)
    if m and m.group(2) in OPENCLIP_BLOCK:
        layer, part, role = m.groups()
        return [Placement(f"{OPENCLIP_COMFY}text_model.encoder.layers.{layer}.{OPENCLIP_BLOCK[part]}.{role}", TE2)]
    return []


def placements(key: str, shape: tuple[int, ...]) -> Optional[list[Placement]]:
    """ComfyUI placements of a checkpoint (or ComfyUI-internal) key; None when no layout is recognised."""
    for prefix, comfy, group in RENAMES:
        if key.startswith(prefix):
            return [Placement(comfy + key[len(prefix):], group)]
    if key.startswith(OPENCLIP):
        return _openclip(key[len(OPENCLIP):], shape)
    if key.startswith(OTHER_PARTS):
        return []
    return None


# module names only a diffusion model saved on its own (no prefix) has, in ComfyUI's names, telling it from other
# state dicts (an LLM's, a text encoder's); from ComfyUI's model detection
BARE_DIFFUSION = ("double_blocks.", "single_blocks.",  # Flux, Chroma, HunyuanVideo (BFL's names)
                  "joint_blocks.",  # SD3
                  "input_blocks.", "middle_block.", "output_blocks.",  # SD1.x / SDXL UNet
                  "noise_refiner.", "context_refiner.",  # Lumina 2, Z-Image
                  "head.modulation", "head.head.",  # Wan
                  "txt_norm.",  # Qwen-Image
                  "double_stream_blocks.",  # HiDream
                  "double_layers.",  # AuraFlow
                  "adaln_single.")  # LTX-Video


# a Flux transformer in diffusers' format (FluxTransformer2DModel's keys, as ComfyUI's loader tells it): its names
# are read under this prefix, the one ComfyUI's LoRA key map gives them (lora_names.flux_diffusers_targets)
FLUX_DIFFUSERS = "transformer."


def source_layout(keys: Iterable[str]) -> tuple[bool, str]:
    """(checkpoint, prefix) of a weight source: `prefix` puts its keys in an understood layout —
    `diffusion_model.` for a diffusion model saved on its own (no key placed as it is, some with a module name
    of BARE_DIFFUSION), FLUX_DIFFUSERS for a diffusers-format Flux, else nothing — and `checkpoint` says whether
    they then are (is_checkpoint)."""
    keys = list(keys)
    if is_checkpoint(keys):
        return True, ""
    if "x_embedder.weight" in keys and any(k.startswith("single_transformer_blocks.") for k in keys):
        return True, FLUX_DIFFUSERS
    if any(k.startswith(BARE_DIFFUSION) for k in keys):
        return True, "diffusion_model."
    return False, ""


def is_checkpoint(keys: Iterable[str]) -> bool:
    """True when any key is in an understood layout (then unplaceable keys are skipped, not named generically)."""
    return any(placements(k, (3,)) for k in keys)
