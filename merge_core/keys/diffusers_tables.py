"""A model's diffusers module names read as places in its kohya-named model (the names ComfyUI gives every
weight): one DiffusersTable per model (keys/flux_names.py, sd3_names.py, zimage_names.py), read the way ComfyUI
maps them (comfy/utils.flux_to_diffusers, mmdit_to_diffusers, z_image_to_diffusers).

A trainer writes `<prefix><block kind><sep><i><sep><path>` or `<prefix><path>` for a module outside the blocks,
with `.` or `_` between the parts (`transformer.transformer_blocks.0.attn.to_q`,
`lycoris_transformer_blocks_0_attn_to_q`); the table says which weight of the model that is — or which row block
of a fused weight (q, k and v apart where the model holds q|k|v in one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Optional

if TYPE_CHECKING:
    import torch

KOHYA = "lora_unet_"
BFL = "diffusion_model."
# what trainers put before a module's path in a diffusers-style model, by the separator of the path: diffusers,
# PEFT; OneTrainer, SimpleTuner LyCORIS
PATH_PREFIXES = {".": ("transformer.", "base_model.model."), "_": ("lora_transformer_", "lycoris_")}


@dataclass(frozen=True)
class Place:
    """Where a module sits in the kohya-named model: `name`, and for a diffusers part of a fused weight its
    row block `part` of `parts` (q, k, v[, Flux's mlp]); `swap`: its two row halves are the other way round."""

    name: str
    part: Optional[int] = None
    swap: bool = False

    @property
    def parts(self) -> int:
        return 4 if self.name.endswith("_linear1") else 3


def halves_swapped(t: "torch.Tensor") -> "torch.Tensor":
    """`t` with its two row halves exchanged (a Place's `swap`: diffusers' norm_out is the final adaLN's
    scale|shift as shift|scale); its own inverse."""
    return t.roll(t.shape[0] // 2, 0)


def kohya_name(model_path: str) -> str:
    return KOHYA + model_path.replace(".", "_")


def _spelled(table: Mapping, sep: str) -> dict:
    """A table keyed by dotted paths, keyed by the paths spelled with `sep`."""
    return {path.replace(".", sep): value for path, value in table.items()}


class DiffusersTable:
    """`prefixes`: by separator; `blocks`: diffusers block kind -> (the model's block kind, {path inside the
    block: (the model's path, row block of its fused weight or None)}); `whole`: the diffusers paths outside the
    blocks -> the model's; `swapped`: the model's paths whose two row halves the diffusers weight has the other
    way round."""

    def __init__(self, prefixes: Mapping[str, tuple[str, ...]],
                 blocks: Mapping[str, tuple[str, Mapping[str, tuple[str, Optional[int]]]]],
                 whole: Mapping[str, str], swapped: Iterable[str] = ()):
        def pattern(starts: tuple[str, ...], sep: str) -> re.Pattern:
            """<prefix>[<block kind><sep><i><sep>]<path>: groups kind, index, path."""
            s = re.escape(sep)
            return re.compile(f"^(?:{'|'.join(map(re.escape, starts))})(?:({'|'.join(blocks)}){s}(\\d+){s})?(.+)$")

        self._patterns = tuple((pattern(starts, sep), sep) for sep, starts in prefixes.items())
        self._blocks = {sep: {kind: (model, _spelled(table, sep)) for kind, (model, table) in blocks.items()}
                        for sep in prefixes}
        self._whole = {sep: _spelled(whole, sep) for sep in prefixes}
        self._swapped = frozenset(swapped)

    def place(self, name: str) -> Optional[Place]:
        """The kohya place of a module with one of the table's names (None: not one)."""
        for pattern, sep in self._patterns:
            found = pattern.match(name)
            if found is not None:
                return self._place(*found.groups(), sep)
        return None

    def _place(self, kind: Optional[str], index: Optional[str], path: str, sep: str) -> Optional[Place]:
        if kind is None:
            model = self._whole[sep].get(path)
            return Place(kohya_name(model), swap=model in self._swapped) if model is not None else None
        model_kind, table = self._blocks[sep][kind]
        found = table.get(path)
        if found is None:
            return None
        model, part = found
        return Place(kohya_name(f"{model_kind}.{index}.{model}"), part)
