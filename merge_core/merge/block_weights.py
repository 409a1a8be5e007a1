"""Block weights (LoRA Block Weight / kohya "LBW" forms): one strength per block of the model, per source.

SDXL forms (the value order of the LoRA Block Weight extension's SDXL presets):
- 20 values "XL full": BASE, IN00–IN08, MID, OUT00–OUT08;
- 12 values "XL": BASE, IN04, IN05, IN07, IN08, MID, OUT00–OUT05 — the blocks that hold attention
  (every module of a plain kohya LoRA).  As in that extension, the blocks the short form does not name
  (IN00–IN03, IN06, OUT06–OUT08: only LoCon conv/resnet modules live there) get weight 0.
BASE is both text encoders.

Flux.1 form, 58 values: BASE, D00–D18 (double blocks), S00–S37 (single blocks), the order in which the
Inspire pack's LBW loader reads a vector for a LoRA on every block.  BASE is every module outside the blocks:
the text encoders and img_in, txt_in, time_in, vector_in, guidance_in, final_layer.

Or BLOCK=VALUE pairs (named_weights).  A module's block: merge_core.keys.blocks.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Sequence

from ..errors import MergeCoreError, finite_numbers
from ..keys.blocks import BLOCKS_12, BLOCKS_20, FLUX_BLOCKS, flux_block_id
from ..keys.flux_names import DOUBLE_BLOCKS, SINGLE_BLOCKS, flux_naming
from ..keys.sdxl_table import sdxl_modules

FORMS = {len(BLOCKS_20): BLOCKS_20, len(BLOCKS_12): BLOCKS_12, len(FLUX_BLOCKS): FLUX_BLOCKS}
FORMS_TEXT = (f"SDXL takes 20 values (BASE, IN00-IN08, MID, OUT00-OUT08) or 12 (BASE, IN04, IN05, IN07, IN08, MID, "
              f"OUT00-OUT05); Flux.1 takes {len(FLUX_BLOCKS)} (BASE, D00-D{DOUBLE_BLOCKS - 1}, "
              f"S00-S{SINGLE_BLOCKS - 1})")
NONE_SPELLINGS = ("", "-", "none")


def parse_block_weights(text: str) -> Optional[tuple[float, ...]]:
    """'1,0.5,…' (commas and/or spaces) -> the values; 'D=0.5, S20-S37=0' -> the whole vector of the model the
    names belong to (named_weights); '-' or 'none' -> None (no block weights)."""
    if text.strip().lower() in NONE_SPELLINGS:
        return None
    if "=" in text:
        return named_weights(text)
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise MergeCoreError(f"block weights must be numbers separated by commas, or BLOCK=VALUE pairs, got "
                             f"{text!r}") from None
    block_table(values)
    return values


_MODELS = {"SDXL": (BLOCKS_20, ("BASE", "IN", "MID", "OUT"), "BASE, IN00-IN08, MID, OUT00-OUT08"),
           "Flux.1": (FLUX_BLOCKS, ("BASE", "D", "S"), f"BASE, D00-D{DOUBLE_BLOCKS - 1}, S00-S{SINGLE_BLOCKS - 1}")}
_NAMED = re.compile(r"^(BASE|MID|IN|OUT|D|S)(\d+)?(?:-(IN|OUT|D|S)?(\d+))?$")


def named_weights(text: str) -> tuple[float, ...]:
    """'BLOCK=VALUE, …' -> the 20 SDXL or 58 Flux.1 values, 1 for every block not named, later pairs over
    earlier ones.  BLOCK: an id (IN04, MID, D7, S12), a group (BASE, IN, OUT, D, S) or a range (IN04-IN08,
    S20-37)."""
    pairs = []
    for item in (p.replace(" ", "") for p in text.split(",") if p.strip()):
        key, _, value = item.partition("=")
        found = _NAMED.match(key.upper())
        if found is None or not value:
            raise MergeCoreError(f"block weights: '{item}' is not BLOCK=VALUE (e.g. IN04=0.5, OUT=0, D0-D9=1, "
                                 f"S=0.5)")
        group, first, end_group, last = found.groups()
        if last is not None and (first is None or end_group not in (None, group)):
            raise MergeCoreError(f"block weights: the range '{key}' must start and end in one group (e.g. IN04-IN08)")
        try:
            number = float(value)
        except ValueError:
            raise MergeCoreError(f"block weights: '{value}' in '{item}' is not a number") from None
        pairs.append((group, first, last, finite_numbers([number], f"block weight {key}")[0]))
    named = {group for group, *_ in pairs} - {"BASE"}
    model = next((m for m, (_, groups, _) in _MODELS.items() if named and named <= set(groups)), None)
    if model is None:
        raise MergeCoreError("block weights name the blocks of one model, " + " or ".join(
            f"{text} ({m})" for m, (_, _, text) in _MODELS.items()) + f"; got {', '.join(sorted(named)) or 'BASE alone'}")
    ids, _, blocks_text = _MODELS[model]
    table = dict.fromkeys(ids, 1.0)
    for group, first, last, number in pairs:
        chosen = [b for b in ids if _in_range(b, group, first, last)]
        if not chosen:
            raise MergeCoreError(f"block weights: {model} has no block {group}{first or ''}"
                                 f"{'-' + last if last else ''} ({blocks_text})")
        table.update(dict.fromkeys(chosen, number))
    return tuple(table.values())


def _in_range(block: str, group: str, first: Optional[str], last: Optional[str]) -> bool:
    """Whether `block` (e.g. IN04) is in `group`, and then in `first`..`last` (or is `first`) when given."""
    digits = block[len(group):]
    if not block.startswith(group) or not (digits == "" or digits.isdigit()):
        return False
    if first is None:
        return True
    return digits != "" and int(first) <= int(digits) <= int(last if last is not None else first)


def block_table(values: Sequence[float]) -> dict[str, float]:
    """Block id -> weight for a 20-, 12- or 58-value list (SDXL blocks the 12-value form leaves out -> 0)."""
    ids = FORMS.get(len(values))
    if ids is None:
        raise MergeCoreError(f"block weights: {FORMS_TEXT}; got {len(values)} values")
    table = dict.fromkeys(BLOCKS_20, 0.0) if ids is not FLUX_BLOCKS else {}
    table.update(zip(ids, finite_numbers(values, "block weights")))
    return table


def block_multiplier(values: Optional[Sequence[float]], arch: str, names: Iterable[str],
                     label: str) -> Callable[[str], float]:
    """module name -> its block's weight (1.0 for every module when `values` is None); `arch` and the module
    `names` of the input called `label` must fit the form (SDXL or Flux.1), or a MergeCoreError says why."""
    if values is None:
        return lambda name: 1.0
    table = block_table(values)
    if len(values) == len(FLUX_BLOCKS):
        if flux_naming(names) is None:
            raise MergeCoreError(f"{len(values)} block weights are Flux.1's; {label} has no Flux double or single "
                                 f"blocks")
        return lambda name: _flux_weight(table, name)
    if arch != "sdxl":
        flux = f" (a Flux.1 LoRA takes {len(FLUX_BLOCKS)} values)" if flux_naming(names) is not None else ""
        raise MergeCoreError(f"{len(values)} block weights are SDXL's; {label} is {arch}{flux}")
    specs = sdxl_modules()

    def multiplier(name: str) -> float:
        spec = specs.get(name)
        if spec is None:
            raise MergeCoreError(f"block weights need SDXL module names; '{name}' is not an SDXL module")
        return table[spec.block]

    return multiplier


def _flux_weight(table: dict[str, float], name: str) -> float:
    block = flux_block_id(name)
    if block not in table:
        raise MergeCoreError(f"Flux block weights are for Flux.1's {DOUBLE_BLOCKS} double and {SINGLE_BLOCKS} single "
                             f"blocks; module '{name}' is in block {block}")
    return table[block]
