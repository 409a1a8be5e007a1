"""Z-Image's (and Lumina 2's) namings of one transformer, as ComfyUI maps them onto the model's weights
(comfy/utils.z_image_to_diffusers, read to learn the mapping):

- ComfyUI's own (kohya `lora_unet_layers_0_attention_qkv`, `diffusion_model.layers.0.attention.qkv`, which
  ComfyUI's "Extract and Save Lora" writes): q|k|v fused in one weight;
- diffusers (AI-Toolkit's `diffusion_model.layers.0.attention.to_q`, SimpleTuner LyCORIS's
  `lycoris_layers_0_attention_to_q`, and Tongyi's diffusers-format transformer files): q, k and v apart, row
  blocks of the fused weight (each `dim` rows in Z-Image; k and v shorter in Lumina 2, whose attention has fewer
  k/v heads — name_match.joined_rows sizes them from the fused weight), `to_out.0` for `out`, `norm_q`/`norm_k`
  for `q_norm`/`k_norm`, `all_final_layer.2-1.` for `final_layer.` and `all_x_embedder.2-1` for `x_embedder`.

The other paths (feed_forward.w1, adaLN_modulation.0, …) are the same in both.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from .diffusers_tables import BFL, KOHYA, PATH_PREFIXES, DiffusersTable, Place

# diffusers path inside a block -> (ComfyUI path, row block of the fused q|k|v weight or None)
_ATTENTION = {"attention.to_q": ("attention.qkv", 0), "attention.to_k": ("attention.qkv", 1),
              "attention.to_v": ("attention.qkv", 2), "attention.to_out.0": ("attention.out", None),
              "attention.norm_q": ("attention.q_norm", None), "attention.norm_k": ("attention.k_norm", None)}
_GLOBAL = {"all_final_layer.2-1.linear": "final_layer.linear",
           "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
           "all_x_embedder.2-1": "x_embedder"}
_BLOCKS = ("layers", "noise_refiner", "context_refiner")  # the same kinds in both namings
ZIMAGE = DiffusersTable({".": (BFL, *PATH_PREFIXES["."]), "_": PATH_PREFIXES["_"]},
                        {kind: (kind, _ATTENTION) for kind in _BLOCKS}, _GLOBAL)


def zimage_place(name: str) -> Optional[Place]:
    """The kohya place of a module with a Z-Image diffusers name: its ComfyUI module, or a row block of the
    fused q|k|v (None: not such a name)."""
    return ZIMAGE.place(name)


ZIMAGE_NAMING = {"kohya": "Z-Image/Lumina 2-style blocks, q|k|v fused",
                 "comfyui": "Z-Image/Lumina 2-style blocks, ComfyUI's module names, q|k|v fused",
                 "diffusers": "Z-Image/Lumina 2-style blocks, diffusers module names with q/k/v split"}  # for people
_BLOCK = f"({'|'.join(_BLOCKS)})"
_FUSED = {"kohya": re.compile(f"^{KOHYA}{_BLOCK}_\\d+_attention_qkv$"),
          "comfyui": re.compile(f"^{re.escape(BFL)}{_BLOCK}\\.\\d+\\.attention\\.qkv$")}


def zimage_naming(names: Iterable[str]) -> Optional[str]:
    """"kohya", "comfyui" or "diffusers" when the module names are those of a Z-Image (or Lumina 2) attention
    block — fused q|k|v, or q, k and v apart — for people; None otherwise."""
    names = list(names)
    for naming, fused in _FUSED.items():
        if any(fused.match(n) for n in names):
            return naming
    if any(p is not None and p.part is not None for p in map(zimage_place, names)):
        return "diffusers"
    return None
