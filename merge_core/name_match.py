"""One model's LoRAs named two ways, merged (or baked into a model named the other way): names are brought to
the kohya ones where that lines modules up, as ComfyUI maps both onto the same weights.

When every input names its diffusion model's modules one way nothing changes.  Otherwise a module is renamed
only where that lines it up with a module named the model's own way (kohya, or ComfyUI's `diffusion_model.`)
that another input holds (the rest keep their names, which ComfyUI reads), taking the first of its places
(places_of) that one does:
- a Flux, SD3 or Z-Image diffusers name (keys/flux_names.py, sd3_names.py, zimage_names.py): its kohya module,
  or a row block of one.  The q, k, v (and Flux's proj_mlp) LoRAs of one block become one LoRA of the fused weight,
  exactly — row blocks ΔW = [c₁·up₁·down₁; …] = blockdiag(c₁·up₁, …)·[down₁; …], rank Σrᵢ, zero rows for a
  part the file does not hold (cᵢ = αᵢ/rᵢ: kept as α/rank when the parts share it, else folded into up in fp32
  with α = rank) — and Flux's norm_out.linear's up has its two row halves swapped.  Parts that are not plain
  LoRAs (LoKr, LoHa, DoRA) keep their names, merged beside the fused module; a `.diff_b` alone under the fused
  module's kohya name (an extract from a diffusers-format Flux writes q|k|v's bias so) joins their LoRA;
- any model's `<prefix><path>` (PREFIXES: ComfyUI's `diffusion_model.`, diffusers' `transformer.`, …), or a
  bare dotted path (Qwen-Image's DiffSynth-trained LoRAs, which ComfyUI maps as they are): kohya's
  `lora_unet_<path with _>`, the same weight wherever the trainer's path is the model's.  Not every trainer's
  is (Wan's diffusers `attn1.to_q` is its `self_attn.q`; diffusion-pipe's HunyuanVideo `img_mod.linear` is
  `img_mod.lin`), and Flux's `transformer_blocks.0.attn.to_q` is a third of a fused weight: renamed without
  evidence, such names would load nowhere.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping, Optional, Sequence

import torch

from .adapters import AdapterModule, FullDiff, LoRA
from .errors import FormatError
from .keys import Naming
from .keys.diffusers_tables import BFL, KOHYA, PATH_PREFIXES, Place, halves_swapped, kohya_name
from .keys.flux_names import MLP_RATIO, flux_place
from .keys.sd3_names import sd3_place
from .keys.zimage_names import zimage_place
from .lora_file import LoraSet, input_label

log = logging.getLogger(__name__)


# prefixes before a module's path in the diffusion model: kohya's form of it is lora_unet_<path with _>
PREFIXES = (BFL, *PATH_PREFIXES["."], *PATH_PREFIXES["_"])
BARE = ""  # the style of an input whose dotted module paths have none of them


def match_names(sets: Sequence[LoraSet]) -> list[LoraSet]:
    """`sets`, with kohya names where the inputs do not all name their diffusion model's modules one way.
    Only the kohya and `diffusion_model.` names are the model's own — but for a `diffusion_model.` name that a
    model's table reads otherwise (AI-Toolkit's Z-Image `diffusion_model.layers.0.attention.to_q`, a third of
    the fused qkv).  A module of the other inputs, and such a name, takes the first of its places that is the
    model's own in some input (so two diffusers-style inputs alone are not renamed: nothing says which reading
    of their paths is the model's); a `diffusion_model.` module takes its kohya name where another input holds
    that or now has it."""
    styles = [_style(s) for s in sets]
    foreign = [style not in (None, KOHYA, BFL) for style in styles]
    tabled = [{n for n in s.modules if _model_places(n)} if style == BFL else set()
              for s, style in zip(sets, styles)]
    if len({style for style in styles if style is not None}) <= 1 and not any(tabled):
        return list(sets)
    kohya = {name: m.matrix_shape[0] for s, style in zip(sets, styles) if style == KOHYA
             for name, m in s.modules.items()}
    own = {**kohya, **{places_of(n)[0].name: m.matrix_shape[0] for s, style, t in zip(sets, styles, tabled)
                       if style == BFL for n, m in s.modules.items() if n not in t}}
    sets = [kohya_named(s, i, own) if f else s for i, (s, f) in enumerate(zip(sets, foreign))]
    renamed = {name for s, f in zip(sets, foreign) if f for name in s.modules}
    renamed |= {p.name for t in tabled for n in t for p in _model_places(n) if p.name in own}
    held = {**{name: own.get(name) for name in renamed}, **kohya}
    return [kohya_named(s, i, held) if style == BFL else s for i, (s, style) in enumerate(zip(sets, styles))]


def _style(s: LoraSet) -> Optional[str]:
    """The prefix an input names its diffusion model's modules with: kohya's `lora_unet_`, or one of PREFIXES
    (`diffusion_model.` first); BARE for dotted paths with none; None otherwise (kohya text encoders only, …)."""
    prefix = next((p for name in s.modules for p in (KOHYA, *PREFIXES) if name.startswith(p)), None)
    return BARE if prefix is None and any("." in name for name in s.modules) else prefix


def places_of(name: str) -> list[Place]:
    """Where a module may sit in the kohya-named model, first choice first: its places by the models' tables (a
    row block of a fused weight, or a norm_out swapped), then kohya's form of its path after the prefix (a bare
    dotted path: of the whole name)."""
    places = _model_places(name)
    prefix = next((p for p in PREFIXES if name.startswith(p)), BARE if "." in name else None)
    if prefix is not None:
        places.append(Place(kohya_name(name[len(prefix):])))
    return places


def _model_places(name: str) -> list[Place]:
    """A module's places by the models' tables of diffusers names (Flux, SD3, Z-Image): one name can be read by
    two (Flux's and SD3's `transformer_blocks.0.attn.to_q`); the module another input holds decides."""
    return [p for p in (flux_place(name), sd3_place(name), zimage_place(name)) if p is not None]


def for_base(s: LoraSet, rows: Mapping[str, Optional[int]]) -> LoraSet:
    """A LoRA under the kohya names of the layers a bake's base holds (`rows`: name -> output rows), where its
    own differ."""
    return kohya_named(s, 0, rows) if _style(s) not in (None, KOHYA) else s


def kohya_named(s: LoraSet, index: int, held: Mapping[str, Optional[int]]) -> LoraSet:
    """One input with its dotted and tabled (Flux, SD3, Z-Image) modules under kohya names (fused weights' parts
    joined), those whose kohya name is in `held` (name -> the module's output rows where known, which size a
    fused weight's row blocks); the others as they are.  A part or norm_out that is not a plain linear LoRA
    keeps its name too (with a warning): side by side with the kohya module it is what ComfyUI's stack does."""
    modules: dict[str, Optional[AdapterModule]] = {}
    parts: dict[str, dict[int, tuple[str, LoRA]]] = {}
    kept = []
    for name, module in s.modules.items():
        place = next((p for p in places_of(name) if p.name in held), None)
        if place is not None and (place.part is not None or place.swap) and not plain_lora(module):
            kept.append(name)
            place = None
        target = place.name if place is not None else name
        if place is not None and place.part is not None:
            parts.setdefault(target, {})[place.part] = (name, module)
            modules.setdefault(target, None)
            continue
        if target in modules and not (modules[target] is None and bias_only(module)):
            raise FormatError(f"{input_label(s, index)} holds module '{target}' twice (as '{name}' and another "
                              "name)")
        modules[target] = swapped_halves(module) if place is not None and place.swap else module
    for target, blocks in parts.items():
        whole = modules[target]
        if whole is not None and not bias_only(whole):
            raise FormatError(f"{input_label(s, index)} holds fused module '{target}' both whole and in parts "
                              f"(e.g. '{next(iter(blocks.values()))[0]}')")
        joined = joined_rows(target, blocks, held.get(target))
        modules[target] = joined if whole is None else with_bias(joined, whole.diff_b)
    if kept:
        log.warning("%d module(s) of %s that are parts of fused weights are not plain linear LoRAs (e.g. '%s', "
                    "%s) and keep their diffusers names: only a LoRA's rows join a fused kohya weight; they are "
                    "carried beside it, as ComfyUI stacks them", len(kept), input_label(s, index), kept[0],
                    s.modules[kept[0]].kind)
    if all(modules.get(name) is module for name, module in s.modules.items()):
        return s  # nothing renamed: the input as it was (its naming style still shows in warnings)
    names = {n: n for n in modules}
    return replace(s, modules=modules, naming=Naming("kohya", s.naming.arch, names), peft_config=None,
                   peft_embeddings=frozenset())


def plain_lora(module: AdapterModule) -> bool:
    """A linear LoRA without DoRA: its rows can be joined or reordered."""
    return (isinstance(module, LoRA) and module.mid is None and len(module.weight_shape) == 2
            and module.dora_scale is None)


def bias_only(module: AdapterModule) -> bool:
    """A `.diff_b` alone: the fused bias an extract from a diffusers-format Flux writes beside the parts' LoRAs."""
    return isinstance(module, FullDiff) and not module.has_weight


def with_bias(m: LoRA, bias: torch.Tensor) -> LoRA:
    """m with `bias` added to its own `.diff_b`."""
    return replace(m, diff_b=bias.float() if m.diff_b is None else m.diff_b + bias.float())


def swapped_halves(m: LoRA) -> LoRA:
    """norm_out.linear as final_layer.adaLN_modulation.1: its output rows' two halves exchanged."""
    return replace(m, up=halves_swapped(m.up), diff_b=halves_swapped(m.diff_b) if m.diff_b is not None else None)


def joined_rows(target: str, blocks: dict[int, tuple[str, LoRA]], rows: Optional[int] = None) -> LoRA:
    """The LoRA of a fused weight (Flux, SD3, Z-Image) from the diffusers LoRAs of its row blocks (see the module
    docstring).  q is as tall as the input is wide; the rest of the fused weight's `rows` (when known) is k|v in
    two halves (Lumina 2's grouped-query attention makes them shorter than q) or Flux's MLP after q|k|v."""
    loras = {i: m for i, (_, m) in blocks.items()}
    widths = {m.down.shape[1] for m in loras.values()}
    if len(widths) != 1:
        raise FormatError(f"the parts of fused module '{target}' read inputs of different widths {sorted(widths)}")
    hidden = widths.pop()
    tall = {i: m.up.shape[0] for i, m in loras.items()}  # the parts' own heights, where the file has them
    if Place(target).parts == 4:
        heights = [hidden] * 3 + [rows - 3 * hidden if rows else tall.get(3, MLP_RATIO * hidden)]
    else:
        kv = (rows - hidden) // 2 if rows else tall.get(1, tall.get(2, hidden))
        heights = [hidden, kv, kv]
    for i, m in loras.items():
        if m.up.shape[0] != heights[i]:
            raise FormatError(f"module '{blocks[i][0]}' has {m.up.shape[0]} output rows; as row block {i} of "
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


def disjoint_note(sets: Sequence[LoraSet]) -> Optional[str]:
    """A warning when two or more inputs (their names matched) share no module: nothing is merged with anything
    (different layers trained, or one model's modules named two ways that match_names cannot line up)."""
    if len(sets) < 2:
        return None
    seen: set[str] = set()
    for s in sets:
        if not seen.isdisjoint(s.modules):
            return None
        seen.update(s.modules)
    firsts = [next(iter(s.modules), None) for s in sets]
    example = ", ".join(f"'{n}' in {input_label(s, i)}" for i, (s, n) in enumerate(zip(sets, firsts)) if n)
    styles = sorted({s.profile for s in sets})
    why = (f" (they name modules in different styles: {' and '.join(styles)}; only SDXL, Flux, SD3 and Z-Image "
           "names, and paths as the model names them, are matched across styles)"
           if len(styles) > 1 and any(s.arch != "sdxl" for s in sets) else "")
    return (f"no module is in more than one input{why}: the result holds each input's modules side by side, "
            f"merged with nothing (e.g. {example})")
