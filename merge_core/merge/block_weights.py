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

Or BLOCK=VALUE pairs (named_weights), resolved per input: SDXL's blocks, or a Flux-style LoRA's Flux.1 blocks
and any it holds beyond them (Flux.2's 48 single blocks, HunyuanVideo's 20 double and 40 single).  A module's
block: merge_core.keys.blocks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

from ..errors import MergeCoreError, finite_numbers
from ..keys.blocks import BLOCKS_12, BLOCKS_20, FLUX_BLOCKS, block_runs, flux_block_id
from ..keys.flux_names import DOUBLE_BLOCKS, SINGLE_BLOCKS, flux_naming
from ..keys.sdxl_table import sdxl_modules

FORMS = {len(BLOCKS_20): BLOCKS_20, len(BLOCKS_12): BLOCKS_12, len(FLUX_BLOCKS): FLUX_BLOCKS}
FORMS_TEXT = (f"SDXL takes 20 values (BASE, IN00-IN08, MID, OUT00-OUT08) or 12 (BASE, IN04, IN05, IN07, IN08, MID, "
              f"OUT00-OUT05); Flux.1 takes {len(FLUX_BLOCKS)} (BASE, D00-D{DOUBLE_BLOCKS - 1}, "
              f"S00-S{SINGLE_BLOCKS - 1})")
NONE_SPELLINGS = ("", "-", "none")
# named pairs: the groups each model's blocks are named by
GROUPS = {"SDXL": ("BASE", "IN", "MID", "OUT"), "Flux": ("BASE", "D", "S")}
GROUPS_TEXT = "BASE, IN00-IN08, MID, OUT00-OUT08 (SDXL) or BASE, D00, D01, …, S00, S01, … (Flux)"
_NAMED = re.compile(r"^(BASE|MID|IN|OUT|D|S)(\d+)?(?:-(IN|OUT|D|S)?(\d+))?$")


@dataclass(frozen=True)
class NamedWeights:
    """BLOCK=VALUE pairs (named_weights) for one model's blocks, resolved per input against them: every block not
    named at 1, later pairs over earlier ones.  A pair is (group, first index, last index, value)."""

    text: str
    model: str
    pairs: tuple[tuple[str, Optional[int], Optional[int], float], ...]


BlockWeights = Union[tuple[float, ...], NamedWeights]


def parse_block_weights(text: str) -> Optional[BlockWeights]:
    """'1,0.5,…' (commas and/or spaces) -> the values; 'D=0.5, S20-S37=0' -> NamedWeights; '-' or 'none' -> None
    (no block weights)."""
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


def named_weights(text: str) -> NamedWeights:
    """'BLOCK=VALUE, …'; BLOCK: an id (IN04, MID, D7, S12), a group (BASE, IN, OUT, D, S) or a range (IN04-IN08,
    S20-37); the groups say the model (SDXL or Flux)."""
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
        first_index = int(first) if first is not None else None
        pairs.append((group, first_index, int(last) if last is not None else first_index,
                      finite_numbers([number], f"block weight {key}")[0]))
    named = {group for group, *_ in pairs} - {"BASE"}
    model = next((m for m, groups in GROUPS.items() if named and named <= set(groups)), None)
    if model is None:
        raise MergeCoreError(f"block weights name the blocks of one model, {GROUPS_TEXT}; got "
                             f"{', '.join(sorted(named)) or 'BASE alone'}")
    return NamedWeights(text.strip(), model, tuple(pairs))


def named_table(named: NamedWeights, ids: Sequence[str], label: str) -> dict[str, float]:
    """Block id -> weight over `ids` (the blocks of `label`'s model): 1 where not named; an error for a pair
    naming no block there."""
    table = dict.fromkeys(ids, 1.0)
    for group, first, last, number in named.pairs:
        chosen = [b for b in ids if _in_range(b, group, first, last)]
        if not chosen:
            span = "" if first is None else f"{first:02d}" + ("" if last == first else f"-{last:02d}")
            raise MergeCoreError(f"block weights: {label} has no block {group}{span} ({block_runs(ids)})")
        table.update(dict.fromkeys(chosen, number))
    return table


def _in_range(block: str, group: str, first: Optional[int], last: Optional[int]) -> bool:
    """Whether `block` (e.g. IN04) is in `group`, and then in `first`..`last` when given."""
    digits = block[len(group):]
    if not block.startswith(group) or not (digits == "" or digits.isdigit()):
        return False
    return first is None or (digits != "" and first <= int(digits) <= last)


def block_table(values: Sequence[float]) -> dict[str, float]:
    """Block id -> weight for a 20-, 12- or 58-value list (SDXL blocks the 12-value form leaves out -> 0)."""
    ids = FORMS.get(len(values))
    if ids is None:
        raise MergeCoreError(f"block weights: {FORMS_TEXT}; got {len(values)} values")
    table = dict.fromkeys(BLOCKS_20, 0.0) if ids is not FLUX_BLOCKS else {}
    table.update(zip(ids, finite_numbers(values, "block weights")))
    return table


def block_multiplier(weights: Optional[BlockWeights], arch: str, names: Iterable[str],
                     label: str) -> Callable[[str], float]:
    """module name -> its block's weight (1.0 for every module when `weights` is None); `arch` and the module
    `names` of the input called `label` must fit the weights' model (SDXL or Flux), or a MergeCoreError says
    why."""
    if weights is None:
        return lambda name: 1.0
    names = list(names)
    flux = flux_naming(names) is not None
    named = isinstance(weights, NamedWeights)
    model = weights.model if named else "Flux" if len(weights) == len(FLUX_BLOCKS) else "SDXL"
    count = "named" if named else str(len(weights))
    if model == "Flux" and not flux:
        raise MergeCoreError(f"{count} block weights are Flux's; {label} has no Flux double or single blocks")
    if model == "SDXL" and arch != "sdxl":
        hint = f" (a Flux LoRA takes {len(FLUX_BLOCKS)} values or D/S names)" if flux else ""
        raise MergeCoreError(f"{count} block weights are SDXL's; {label} is {arch}{hint}")
    ids = BLOCKS_20
    if model == "Flux":  # for names, also the blocks it holds beyond Flux.1's (Flux.2, HunyuanVideo)
        held = {flux_block_id(n) for n in names}
        ids = (*FLUX_BLOCKS, *sorted(held - set(FLUX_BLOCKS)))
    table = named_table(weights, ids, label) if named else block_table(weights)
    if model == "Flux":
        return lambda name: _flux_weight(table, name)
    specs = sdxl_modules()

    def multiplier(name: str) -> float:
        spec = specs.get(name)
        if spec is None:
            raise MergeCoreError(f"block weights need SDXL module names; '{name}' is not an SDXL module")
        return table[spec.block]

    return multiplier


def block_weights_record(weights: Optional[BlockWeights]) -> Union[list[float], str, None]:
    """How a recipe records one input's block weights: the values, or the named pairs as given."""
    if isinstance(weights, NamedWeights):
        return weights.text
    return None if weights is None else list(weights)


def _flux_weight(table: dict[str, float], name: str) -> float:
    block = flux_block_id(name)
    if block not in table:
        raise MergeCoreError(f"{len(FLUX_BLOCKS)} block weights are for Flux.1's {DOUBLE_BLOCKS} double and "
                             f"{SINGLE_BLOCKS} single blocks; module '{name}' is in block {block} (name blocks "
                             f"instead: D=…, S20-S47=…)")
    return table[block]
