"""Z-Image's (and Lumina 2's) namings of one transformer, as ComfyUI maps them onto the model's weights
(comfy/utils.z_image_to_diffusers, read to learn the mapping):

- ComfyUI's own (kohya `lora_unet_layers_0_attention_qkv`, `diffusion_model.layers.0.attention.qkv`, which
  ComfyUI's "Extract and Save Lora" writes): q|k|v fused in one weight;
- diffusers (AI-Toolkit's `diffusion_model.layers.0.attention.to_q`, SimpleTuner LyCORIS's
  `lycoris_layers_0_attention_to_q`): q, k and v apart, each `dim` rows of the fused weight, `to_out.0` for
  `out`, `all_final_layer.2-1.` for `final_layer.` and `all_x_embedder.2-1` for `x_embedder`.

The other paths (feed_forward.w1, adaLN_modulation.0, …) are the same in both.
"""
from __future__ import annotations

import re
from typing import Optional

from .flux_names import BFL, PATH_PREFIXES, Place, kohya_name

# diffusers path inside an attention block -> (ComfyUI path, row block of the fused q|k|v weight or None)
_ATTENTION = {"to_q": ("qkv", 0), "to_k": ("qkv", 1), "to_v": ("qkv", 2), "to_out.0": ("out", None)}
_GLOBAL = {"all_final_layer.2-1.linear": "final_layer.linear",
           "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
           "all_x_embedder.2-1": "x_embedder"}
_BLOCK_KINDS = ("layers", "noise_refiner", "context_refiner")
_PREFIXES = {".": (BFL, *PATH_PREFIXES["."]), "_": PATH_PREFIXES["_"]}


def _spelled(table: dict, sep: str) -> dict:
    return {path.replace(".", sep): value for path, value in table.items()}


_TABLES = {sep: (_spelled(_ATTENTION, sep), _spelled(_GLOBAL, sep)) for sep in _PREFIXES}


def _pattern(sep: str) -> re.Pattern:
    """<prefix>(<block kind>.<i>.attention.<path> | <global path>), with `sep` between the parts."""
    attention, whole = (("|".join(map(re.escape, table))) for table in _TABLES[sep])
    s = re.escape(sep)
    return re.compile(f"^(?:{'|'.join(map(re.escape, _PREFIXES[sep]))})"
                      f"(?:({'|'.join(_BLOCK_KINDS)}){s}(\\d+){s}attention{s}({attention})|({whole}))$")


_NAMES = tuple((_pattern(sep), sep) for sep in _PREFIXES)


def zimage_place(name: str) -> Optional[Place]:
    """The kohya place of a module with a Z-Image diffusers name: its ComfyUI module, or a row block of the
    fused q|k|v (None: not such a name)."""
    for pattern, sep in _NAMES:
        found = pattern.match(name)
        if found is None:
            continue
        kind, index, inside, whole = found.groups()
        attention, globals_ = _TABLES[sep]
        if whole is not None:
            return Place(kohya_name(globals_[whole]))
        path, part = attention[inside]
        return Place(kohya_name(f"{kind}.{index}.attention.{path}"), part)
    return None
