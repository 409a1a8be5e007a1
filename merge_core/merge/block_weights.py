"""SDXL block weights (LoRA Block Weight / kohya "LBW" forms): one strength per UNet block, per source.

Forms (the value order of the LoRA Block Weight extension's SDXL presets):
- 20 values "XL full": BASE, IN00–IN08, MID, OUT00–OUT08;
- 12 values "XL": BASE, IN04, IN05, IN07, IN08, MID, OUT00–OUT05 — the blocks that hold attention
  (every module of a plain kohya LoRA).  As in that extension, the blocks the short form does not name
  (IN00–IN03, IN06, OUT06–OUT08: only LoCon conv/resnet modules live there) get weight 0.
BASE is both text encoders.  A module's block comes from merge_core.keys.sdxl_table (field `block`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..errors import MergeCoreError, finite_numbers
from ..keys.sdxl_table import sdxl_modules

BLOCKS_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))
BLOCKS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6)))
FORMS = {len(BLOCKS_20): BLOCKS_20, len(BLOCKS_12): BLOCKS_12}
NONE_SPELLINGS = ("", "-", "none")


def parse_block_weights(text: str) -> Optional[tuple[float, ...]]:
    """'1,0.5,…' (commas and/or spaces) -> the values; '-' or 'none' -> None (no block weights)."""
    if text.strip().lower() in NONE_SPELLINGS:
        return None
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise MergeCoreError(f"block weights must be numbers separated by commas, got {text!r}") from None
    block_table(values)
    return values


def block_table(values: Sequence[float]) -> dict[str, float]:
    """Block id -> weight for a 20- or 12-value list (blocks the 12-value form leaves out -> 0)."""
    ids = FORMS.get(len(values))
    if ids is None:
        raise MergeCoreError(f"SDXL block weights take 20 values (BASE, IN00-IN08, MID, OUT00-OUT08) or 12 "
                             f"(BASE, IN04, IN05, IN07, IN08, MID, OUT00-OUT05), got {len(values)}")
    table = dict.fromkeys(BLOCKS_20, 0.0)
    table.update(zip(ids, finite_numbers(values, "block weights")))
    return table


def block_multiplier(values: Optional[Sequence[float]]) -> Callable[[str], float]:
    """module name -> its block's weight (1.0 for every module when `values` is None)."""
    if values is None:
        return lambda name: 1.0
    table, specs = block_table(values), sdxl_modules()

    def multiplier(name: str) -> float:
        spec = specs.get(name)
        if spec is None:
            raise MergeCoreError(f"block weights need SDXL module names; '{name}' is not an SDXL module")
        return table[spec.block]

    return multiplier
