"""Find the base-model tensor each LoRA module patches: the extractor's names run backwards.

Built from the base's own keys (so it works for SDXL/SD1.x checkpoints, ComfyUI-internal keys and generic
state dicts alike): every (module name, role) the extractor would write for a key points back at that key,
with the row block (TE2 q/k/v inside `in_proj_weight`) or transpose (`text_projection`) to apply.  Other
spellings of the same module are accepted too: ComfyUI's generic `diffusion_model.…` / `text_encoders.…`
names and their kohya spelling `lora_unet_<path>` (where the extractor writes `diffusion_model.<path>`, as for
Z-Image's diffusers spelling), the checkpoint key path itself, the original extractor's
`diffusion_model.<checkpoint key>`, a PEFT adapter's `base_model.model.<key path>` (an LLM's state dict), and
every SDXL alias merge_core.keys knows (diffusers, PEFT-diffusers, …).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..checkpoint.layout import UNET, source_layout
from ..checkpoint.lora_names import Target, split_role, targets_of
from ..checkpoint.sources import WeightSource
from ..keys.diffusers_tables import BFL, PATH_PREFIXES, kohya_name
from ..keys.sdxl_table import sdxl_aliases


@dataclass(frozen=True)
class Slot:
    """The base tensor `key` (or the part of it `target` selects), of `shape` after the selection."""

    key: str
    target: Target
    shape: tuple[int, ...]


class BakeIndex:
    def __init__(self, base: WeightSource):
        keys = base.keys()
        checkpoint, prefix = source_layout(keys)
        self.slots: dict[tuple[str, str], Slot] = {}
        self.aliases: dict[str, str] = {}
        for key in keys:
            shape = tuple(base.shape(key))
            for t in targets_of(key, shape, checkpoint, prefix):
                self.slots.setdefault((t.name, t.role), Slot(key, t, t.part_shape(shape)))
                for alias in self._aliases(key, t):
                    self.aliases.setdefault(alias, t.name)

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

    def slot(self, name: str, role: str) -> Optional[Slot]:
        return self.slots.get((name, role))
