"""One model's LoRAs named two ways, merged (or baked into a model named the other way): names are brought to
the kohya ones where that lines modules up, as ComfyUI maps both onto the same weights.

When every input names its diffusion model's modules one way nothing changes.  Otherwise a module is renamed
only where that lines it up with another input's (the rest keep their names, which ComfyUI reads):
- `diffusion_model.<path>` (ComfyUI's own keys; BFL's Flux names; Wan's …) becomes kohya's
  `lora_unet_<path with _>`, the name ComfyUI gives the same weight — when another input holds that name (some
  trainers' dotted paths are not the model's: diffusion-pipe's HunyuanVideo `img_mod.linear` is the model's
  `img_mod.lin`, so an unconditional rename could make a name no loader maps);
- a Flux diffusers name (keys/flux_names.py) becomes its kohya name where another input holds that module
  (under either name): a diffusers LoRA's q, k, v (and proj_mlp) modules of one block become one LoRA of the
  fused weight, exactly — row blocks ΔW = [c₁·up₁·down₁; …] = blockdiag(c₁·up₁, …)·[down₁; …], rank Σrᵢ, zero
  rows for a part the file does not hold (cᵢ = αᵢ/rᵢ: kept as α/rank when the parts share it, else folded into
  up in fp32 with α = rank) — and norm_out.linear's up has its two row halves swapped.  Parts that are not
  plain LoRAs (LoKr, LoHa, DoRA) keep their names, merged beside the fused module.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional, Sequence

import torch

from .adapters import AdapterModule, LoRA
from .errors import FormatError
from .keys import Naming
from .keys.flux_names import BFL, KOHYA, MLP_RATIO, Place, naming_style, place_of
from .lora_file import LoraSet, input_label

log = logging.getLogger(__name__)


def match_names(sets: Sequence[LoraSet]) -> list[LoraSet]:
    """`sets`, with kohya names where the inputs do not all name their diffusion model's modules one way."""
    styles = [_style(s) for s in sets]
    if len({style for style in styles if style is not None}) <= 1:
        return list(sets)
    kohya = {name for s, style in zip(sets, styles) if style == "kohya" for name in s.modules}
    dotted = {place.name for s, style in zip(sets, styles) if style == "dotted" for name in s.modules
              if name.startswith(BFL) and (place := place_of(name)) is not None}
    sets = [kohya_named(s, i, kohya | dotted) if style == "diffusers" else s
            for i, (s, style) in enumerate(zip(sets, styles))]
    joined = {name for s, style in zip(sets, styles) if style == "diffusers" for name in s.modules}
    return [kohya_named(s, i, kohya | joined) if style == "dotted" else s
            for i, (s, style) in enumerate(zip(sets, styles))]


def _style(s: LoraSet) -> Optional[str]:
    """How an input names its diffusion model's modules: "kohya" (`lora_unet_…`), "dotted"
    (`diffusion_model.…`), "diffusers" (Flux's diffusers names), or None (none of these: a text encoder only,
    a language model, …)."""
    for name in s.modules:
        if name.startswith(KOHYA):
            return "kohya"
        if name.startswith(BFL):
            return "dotted"
    return "diffusers" if naming_style(s.modules) == "diffusers" else None


def for_base(s: LoraSet, names: set[str]) -> LoraSet:
    """A diffusers-named Flux LoRA under the kohya names of the layers a bake's base holds (`names`)."""
    return kohya_named(s, 0, names) if naming_style(s.modules) == "diffusers" else s


def kohya_named(s: LoraSet, index: int, held: set[str]) -> LoraSet:
    """One input with its dotted and Flux modules under kohya names (fused weights' parts joined), those whose
    kohya name is in `held`; the others as they are.  A part or norm_out that is not a plain
    linear LoRA keeps its name too (with a warning): side by side with the kohya module it is what ComfyUI's
    stack does."""
    modules: dict[str, Optional[AdapterModule]] = {}
    parts: dict[str, dict[int, tuple[str, LoRA]]] = {}
    kept = []
    for name, module in s.modules.items():
        place = place_of(name)
        if place is not None and place.name not in held:
            place = None
        if place is not None and (place.part is not None or place.swap) and not plain_lora(module):
            kept.append(name)
            place = None
        target = place.name if place is not None else name
        if place is not None and place.part is not None:
            parts.setdefault(target, {})[place.part] = (name, module)
            modules.setdefault(target, None)
            continue
        if target in modules:
            raise FormatError(f"{input_label(s, index)} holds module '{target}' twice (as '{name}' and another "
                              "name)")
        modules[target] = swapped_halves(module) if place is not None and place.swap else module
    for target, blocks in parts.items():
        if modules[target] is not None:
            raise FormatError(f"{input_label(s, index)} holds Flux module '{target}' both whole and in parts "
                              f"(e.g. '{next(iter(blocks.values()))[0]}')")
        modules[target] = joined_rows(target, blocks)
    if kept:
        log.warning("%d Flux module(s) of %s are not plain linear LoRAs (e.g. '%s', %s) and keep their diffusers "
                    "names: only a LoRA's rows join a fused kohya weight; they are carried beside it, as ComfyUI "
                    "stacks them", len(kept), input_label(s, index), kept[0], s.modules[kept[0]].kind)
    names = {n: n for n in modules}
    return replace(s, modules=modules, naming=Naming("kohya", s.naming.arch, names), peft_config=None,
                   peft_embeddings=frozenset())


def plain_lora(module: AdapterModule) -> bool:
    """A linear LoRA without DoRA: its rows can be joined or reordered."""
    return (isinstance(module, LoRA) and module.mid is None and len(module.weight_shape) == 2
            and module.dora_scale is None)


def swapped_halves(m: LoRA) -> LoRA:
    """norm_out.linear as final_layer.adaLN_modulation.1: its output rows' two halves exchanged."""
    half = m.up.shape[0] // 2
    order = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
    return replace(m, up=m.up[order], diff_b=m.diff_b[order] if m.diff_b is not None else None)


def joined_rows(target: str, blocks: dict[int, tuple[str, LoRA]]) -> LoRA:
    """The LoRA of a fused Flux weight from the diffusers LoRAs of its row blocks (see the module docstring)."""
    loras = {i: m for i, (_, m) in blocks.items()}
    widths = {m.down.shape[1] for m in loras.values()}
    if len(widths) != 1:
        raise FormatError(f"the parts of Flux module '{target}' read inputs of different widths {sorted(widths)}")
    hidden = widths.pop()
    heights = [hidden] * Place(target).parts
    if len(heights) == 4:
        heights[3] = loras[3].up.shape[0] if 3 in loras else MLP_RATIO * hidden
    for i, m in loras.items():
        if m.up.shape[0] != heights[i]:
            raise FormatError(f"Flux module '{blocks[i][0]}' has {m.up.shape[0]} output rows; as row block {i} of "
                              f"'{target}' it needs {heights[i]}")
    starts = [sum(heights[:i]) for i in range(len(heights))]
    rank = sum(m.rank for m in loras.values())
    scales, dtypes = {m.scale for m in loras.values()}, {m.up.dtype for m in loras.values()}
    same = len(scales) == 1 and len(dtypes) == 1  # α/r kept as α, the factors in their dtype: no copy in fp32
    up = torch.zeros(sum(heights), rank, dtype=dtypes.pop() if same else torch.float32)
    downs, at = [], 0
    bias = None
    for i, m in sorted(loras.items()):
        up[starts[i]:starts[i] + heights[i], at:at + m.rank] = m.up if same else m.up.float() * m.scale
        downs.append(m.down if same else m.down.float())
        at += m.rank
        if m.diff_b is not None:
            bias = torch.zeros(sum(heights)) if bias is None else bias
            bias[starts[i]:starts[i] + heights[i]] = m.diff_b.float()
    return LoRA(up, torch.cat(downs), rank * scales.pop() if same else float(rank), diff_b=bias)
