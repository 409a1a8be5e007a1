"""The SDXL module table (data/sdxl_modules.json, made by tools/make_sdxl_table.py from ComfyUI's own SDXL
definition on the meta device) and every alias name a LoRA file may use for each module."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

TABLE_PATH = Path(__file__).resolve().parent.parent / "data" / "sdxl_modules.json"
TE_PREFIX = {"te1": ("clip_l", "text_encoder"), "te2": ("clip_g", "text_encoder_2")}


@dataclass(frozen=True)
class ModuleSpec:
    name: str  # kohya name, what we write
    group: str  # unet | te1 | te2
    kind: str  # linear | conv
    shape: tuple[int, ...]
    key: str  # ComfyUI state-dict weight key
    diffusers: Optional[str]
    block: str  # LBW block id: BASE, IN00..IN08, MID, OUT00..OUT08
    locon: bool  # True for the conv/extra modules LoCon adds

    @property
    def matrix_shape(self) -> tuple[int, int]:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return self.shape[0], n


@lru_cache(maxsize=1)
def sdxl_modules() -> dict[str, ModuleSpec]:
    """kohya name -> spec, in model order."""
    rows = json.loads(TABLE_PATH.read_text())
    rows = rows["modules"] if isinstance(rows, dict) else rows
    return {r["name"]: ModuleSpec(r["name"], r["group"], r["kind"], tuple(r["shape"]), r["key"],
                                  r.get("diffusers"), r["block"], bool(r["locon"])) for r in rows}


def _aliases(spec: ModuleSpec) -> set[str]:
    weight_path = spec.key[: -len(".weight")]
    names = {spec.name, weight_path}
    if spec.group == "unet":
        names.add(weight_path)  # diffusion_model.<ldm path>
        if spec.diffusers:
            d = spec.diffusers
            flat = d.replace(".", "_")
            names |= {f"lora_unet_{flat}", f"lycoris_{flat}"}
            for variant in {d, d.replace(".to_", ".processor.to_")}:
                if variant.endswith(".processor.to_out.0"):
                    variant = variant[:-2]
                names |= {variant, f"unet.{variant}"}
    else:
        comfy_name, diffusers_te = TE_PREFIX[spec.group]
        names.add(f"text_encoders.{weight_path}")
        inner = weight_path[len(comfy_name) + len(".transformer."):]
        names |= {f"{diffusers_te}.{inner}", f"lora_{spec.group}_{inner.replace('.', '_')}"}
    return names


@lru_cache(maxsize=1)
def sdxl_aliases() -> dict[str, str]:
    """Every module prefix a reader may meet -> the kohya name."""
    out: dict[str, str] = {}
    for spec in sdxl_modules().values():
        for alias in _aliases(spec):
            out[alias] = spec.name
    return out


def block_of(name: str) -> Optional[str]:
    spec = sdxl_modules().get(name)
    return spec.block if spec else None
