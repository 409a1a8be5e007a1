"""Flux's namings of one transformer, as ComfyUI maps them onto the model's weights.

- kohya (sd-scripts, and what ComfyUI names every weight): `lora_unet_double_blocks_0_img_attn_qkv`, BFL's
  module paths with `_`, q|k|v fused in one weight;
- BFL with dots: `diffusion_model.double_blocks.0.img_attn.qkv` (the same weights);
- diffusers (AI-Toolkit, SimpleTuner, PEFT): `transformer.transformer_blocks.0.attn.to_q`, q, k and v apart;
  OneTrainer's `lora_transformer_transformer_blocks_0_attn_to_q` and SimpleTuner LyCORIS's `lycoris_…` are
  the same names with `_`.

A diffusers module is one row block of a BFL weight: img_attn.qkv = [to_q; to_k; to_v], txt_attn.qkv =
[add_q_proj; add_k_proj; add_v_proj], linear1 = [to_q; to_k; to_v; proj_mlp] (h rows each, the MLP 4h);
norm_out.linear is final_layer.adaLN_modulation.1 with its two row halves swapped (scale|shift, shift|scale).
Flux's CLIP-L: diffusers `text_encoder.text_model.encoder.layers.0.mlp.fc1` is kohya
`lora_te1_text_model_encoder_layers_0_mlp_fc1` (ComfyUI maps no diffusers name onto the T5).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from .diffusers_tables import BFL, KOHYA, PATH_PREFIXES, DiffusersTable, Place

CLIP_L = "text_encoder.text_model.encoder.layers."
MLP_RATIO = 4  # linear1's MLP rows per hidden unit (Flux.1 dev/schnell)
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38  # Flux.1 dev/schnell
FLUX_NAMING = {"kohya": "Flux-style blocks", "bfl": "Flux-style blocks, BFL module names",
               "diffusers": "Flux-style blocks, diffusers module names with q/k/v split"}  # for people

# diffusers path inside a double block -> (BFL path, row block of a fused q|k|v weight or None)
_DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
           "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
           "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
           "attn.to_add_out": ("txt_attn.proj", None), "norm1.linear": ("img_mod.lin", None),
           "norm1_context.linear": ("txt_mod.lin", None), "ff.net.0.proj": ("img_mlp.0", None),
           "ff.net.2": ("img_mlp.2", None), "ff_context.net.0.proj": ("txt_mlp.0", None),
           "ff_context.net.2": ("txt_mlp.2", None)}
_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
           "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None)}
_GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "norm_out.linear": "final_layer.adaLN_modulation.1",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
_SWAPPED = "final_layer.adaLN_modulation.1"
_BLOCKS = {"transformer_blocks": ("double_blocks", _DOUBLE), "single_transformer_blocks": ("single_blocks", _SINGLE)}
FLUX = DiffusersTable(PATH_PREFIXES, _BLOCKS, _GLOBAL, swapped=[_SWAPPED])


# a block's RMSNorm scales, which have no LoRA name: diffusers' attn.norm_* weight is BFL's *.norm.*_norm.scale
_NORM_SCALES = {"transformer_blocks": ("double_blocks", {"norm_q": "img_attn.norm.query_norm.scale",
                                                         "norm_k": "img_attn.norm.key_norm.scale",
                                                         "norm_added_q": "txt_attn.norm.query_norm.scale",
                                                         "norm_added_k": "txt_attn.norm.key_norm.scale"}),
                "single_transformer_blocks": ("single_blocks", {"norm_q": "norm.query_norm.scale",
                                                                "norm_k": "norm.key_norm.scale"})}
_NORM_SCALE = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.(norm_\w+)$")


def flux_norm_scale(name: str) -> Optional[str]:
    """ComfyUI's name (BFL's key) of the RMSNorm scale a diffusers Flux module `transformer.<block>.<i>.attn.norm_q`
    (norm_k, norm_added_q, norm_added_k) is; None for any other name."""
    found = _NORM_SCALE.match(name)
    if found is None:
        return None
    kind, table = _NORM_SCALES[found[1]]
    path = table.get(found[3])
    return f"{BFL}{kind}.{found[2]}.{path}" if path is not None else None


def flux_place(name: str) -> Optional[Place]:
    """The kohya place of a module with a Flux diffusers name, or of Flux's CLIP-L (None: neither)."""
    if name.startswith(CLIP_L):
        return Place("lora_te1_" + name[len("text_encoder."):].replace(".", "_"))
    return FLUX.place(name)


# a block in BFL's names or diffusers' (transformer_blocks.i is double_blocks.i, single_transformer_blocks.i is
# single_blocks.i): the leftmost match, so `_single_transformer_blocks_` is never read as `_transformer_blocks_`
_IN_BLOCK = re.compile(r"(?:^|[._])(double_blocks|single_blocks|single_transformer_blocks|transformer_blocks)"
                       r"[._](\d+)(?:[._]|$)")
_BLOCK_KIND = {"double_blocks": "double", "transformer_blocks": "double", "single_blocks": "single",
               "single_transformer_blocks": "single"}


def flux_block(name: str) -> Optional[tuple[str, int]]:
    """("double" | "single", block index) of a module inside a Flux block, in any naming — by the block in its
    name, so a module the diffusers table does not list (a LyCORIS diff on attn.norm_q) is placed too; None
    outside the blocks."""
    found = _IN_BLOCK.search(name)
    return (_BLOCK_KIND[found[1]], int(found[2])) if found else None


# names only Flux's diffusers layout has: SD3, Qwen-Image and HiDream name their blocks transformer_blocks too,
# and SD3's have ff_context and norm1_context as well (a diffusers Flux LoRA of double blocks alone is not told)
_FLUX_DIFFUSERS = re.compile(r"(^|[._])single_transformer_blocks[._]")


def flux_naming(names: Iterable[str]) -> Optional[str]:
    """"kohya", "bfl" or "diffusers" when the module names are Flux-style (BFL's double/single blocks, which
    HunyuanVideo shares; or diffusers names only Flux has), for people; None otherwise."""
    names = list(names)
    if any(n.startswith((KOHYA + "double_blocks_", KOHYA + "single_blocks_")) for n in names):
        return "kohya"
    if any(n.startswith((BFL + "double_blocks.", BFL + "single_blocks.")) for n in names):
        return "bfl"
    if any(_FLUX_DIFFUSERS.search(n) for n in names):
        return "diffusers"
    return None
