"""Find the base-model tensor each LoRA module patches: the extractor's names run backwards.

Built from the base's own keys (so it works for SDXL/SD1.x checkpoints, ComfyUI-internal keys and generic
state dicts alike): every (module name, role) the extractor would write for a key points back at that key,
with the row block (TE2 q/k/v inside `in_proj_weight`) or transpose (`text_projection`) to apply.  Other
spellings of the same module are accepted too: ComfyUI's generic `diffusion_model.…` / `text_encoders.…`
names and their kohya spelling `lora_unet_<path>` (where the extractor writes `diffusion_model.<path>`, as for
Z-Image's diffusers spelling), the checkpoint key path itself, the original extractor's
`diffusion_model.<checkpoint key>`, a PEFT adapter's `base_model.model.<key path>` (an LLM's state dict), and
every SDXL alias merge_core.keys knows (diffusers, PEFT-diffusers, …).

A diffusers-format Flux holds apart what kohya and BFL names fuse: a kohya (or BFL-named) LoRA's
`double_blocks_0_img_attn_qkv` patches to_q, to_k and to_v, each with its row block of ΔW (linear1: to_q, to_k,
to_v, proj_mlp), and `final_layer_adaLN_modulation_1` patches norm_out.linear with ΔW's row halves swapped —
as ComfyUI applies the LoRA to the model it converts that transformer into; a full diff's BFL-named RMSNorm
scale (`diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale`) patches attn.norm_q.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..checkpoint.layout import FLUX_DIFFUSERS, UNET, source_layout
from ..checkpoint.lora_names import BIAS, WEIGHT, Target, split_role, targets_of
from ..checkpoint.sources import WeightSource
from ..keys.diffusers_tables import BFL, PATH_PREFIXES, Place, halves_swapped, kohya_name
from ..keys.flux_names import flux_norm_scale, flux_place
from ..keys.sdxl_table import sdxl_aliases


@dataclass(frozen=True)
class Slot:
    """The base tensor `key` (or the part of it `target` selects), of `shape` after the selection; for a part
    of a fused module, the row block [start, stop) of the module's ΔW (of `fused_rows` rows) it takes, and
    `swap`: ΔW's two row halves the other way round."""

    key: str
    target: Target
    shape: tuple[int, ...]
    rows: Optional[tuple[int, int]] = None
    fused_rows: Optional[int] = None
    swap: bool = False

    @property
    def module_shape(self) -> tuple[int, ...]:
        """The shape of the module's ΔW that patches this slot."""
        return self.shape if self.fused_rows is None else (self.fused_rows, *self.shape[1:])

    @property
    def is_piece(self) -> bool:
        """Only part of the module's ΔW patches it, or ΔW rearranged."""
        return self.rows is not None or self.swap

    def piece(self, delta: torch.Tensor) -> torch.Tensor:
        """What of the module's ΔW patches this slot, shaped as the slot."""
        d = delta.reshape(self.module_shape)
        if self.swap:
            d = halves_swapped(d)
        return d if self.rows is None else d[self.rows[0]:self.rows[1]]


def _stacked(parts: list[Slot]) -> list[Slot]:
    """The parts of one fused weight in row order, each with its row block of the fused ΔW."""
    total, start, out = sum(p.shape[0] for p in parts), 0, []
    for p in parts:
        out.append(replace(p, rows=(start, start + p.shape[0]), fused_rows=total))
        start += p.shape[0]
    return out


class BakeIndex:
    def __init__(self, base: WeightSource):
        keys = base.keys()
        checkpoint, prefix = source_layout(keys)
        self.slots: dict[tuple[str, str], Slot] = {}
        self.aliases: dict[str, str] = {}
        self.pieces: dict[tuple[str, str], list[Slot]] = {}  # kohya module, role -> the slots its ΔW is cut into
        parts: dict[tuple[str, str], dict[int, Slot]] = {}  # a kohya module's parts in a diffusers Flux
        for key in keys:
            shape = tuple(base.shape(key))
            for t in targets_of(key, shape, checkpoint, prefix):
                slot = Slot(key, t, t.part_shape(shape))
                self.slots.setdefault((t.name, t.role), slot)
                for alias in self._aliases(key, t):
                    self.aliases.setdefault(alias, t.name)
                if prefix == FLUX_DIFFUSERS:
                    self._add_flux_names(slot, parts)
        for (name, role), found in parts.items():
            if len(found) == Place(name).parts:  # every part in the base: their rows place each one
                self.pieces[name, role] = _stacked([found[i] for i in sorted(found)])

    def _add_flux_names(self, slot: Slot, parts: dict[tuple[str, str], dict[int, Slot]]) -> None:
        """A diffusers-format Flux's slot under its kohya (BFL) name: a whole weight as an alias (x_embedder is
        lora_unet_img_in, attn.norm_q a BFL query_norm.scale), a swapped one as a piece, a part into `parts`."""
        t = slot.target
        place = flux_place(t.name)
        if place is None:
            scale = flux_norm_scale(t.name)
            if scale is not None:
                self.aliases.setdefault(scale, t.name)
        elif place.swap:
            self.pieces.setdefault((place.name, t.role), [replace(slot, swap=True)])
        elif place.part is not None:
            parts.setdefault((place.name, t.role), {})[place.part] = slot
        else:
            self.aliases.setdefault(place.name, t.name)

    @staticmethod
    def _aliases(key: str, t: Target) -> list[str]:
        comfy_stem = split_role(t.placement.comfy_key)[0]
        names = [t.name, comfy_stem]
        if t.group != UNET:
            names.append("text_encoders." + comfy_stem)
        elif comfy_stem.startswith(BFL):
            names.append(kohya_name(comfy_stem[len(BFL):]))
        if t.placement.rows is None and not t.placement.transpose:
            stem = split_role(key)[0]
            names += [stem] + [prefix + stem for prefix in (BFL, *PATH_PREFIXES["."])]
        return names

    def resolve(self, name: str) -> Optional[str]:
        """The canonical module name for a LoRA module name, or None when the base has no such layer."""
        if name in self.aliases:
            return self.aliases[name]
        kohya = sdxl_aliases().get(name)
        return self.aliases.get(kohya) if kohya is not None else None

    def rows(self) -> dict[str, Optional[int]]:
        """The canonical module name of every layer the base holds -> its weight's output rows (None: a bias or
        a scalar alone)."""
        rows: dict[str, Optional[int]] = {name: None for name, _ in self.slots}
        for (name, role), slot in self.slots.items():
            if role == "weight" and slot.shape:
                rows[name] = slot.shape[0]
        return rows

    def slots_of(self, name: str, role: str) -> Optional[list[Slot]]:
        """The slots a LoRA module's `role` patches ([] when the base layer has no such role), or None when the
        base has no such layer."""
        kohya = kohya_name(name[len(BFL):]) if name.startswith(BFL) else name  # BFL's dotted names of Flux
        canonical = self.resolve(name) or self.resolve(kohya)
        if canonical is not None:
            slot = self.slots.get((canonical, role))
            return [slot] if slot is not None else []
        if any((kohya, r) in self.pieces for r in (WEIGHT, BIAS)):
            return self.pieces.get((kohya, role), [])
        return None
