"""The blocks that block weights and the report's picture use, and which of them a LoRA's modules sit in.

SDXL: the LoRA Block Weight blocks BASE (both text encoders), IN00–IN08, MID, OUT00–OUT08 (a module's block from
the SDXL table); its 12-value form names only the blocks that hold attention.  Flux: BASE (text encoders and
every layer outside the blocks), D00, D01, … (double blocks), S00, … (single blocks), read from a module's name in
any Flux naming (flux_names.flux_block); Flux.1 has D00–D18 and S00–S37, a Flux-style LoRA may hold more
(Flux.2's 48 single blocks, HunyuanVideo's 20 double and 40 single).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

from .flux_names import DOUBLE_BLOCKS, SINGLE_BLOCKS, flux_block, flux_naming
from .sdxl_table import sdxl_modules

BLOCKS_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))
BLOCKS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6)))
FLUX_BLOCKS = ("BASE", *(f"D{i:02d}" for i in range(DOUBLE_BLOCKS)), *(f"S{i:02d}" for i in range(SINGLE_BLOCKS)))
_ID = re.compile(r"^([A-Z]+)(\d*)$")


def flux_block_id(name: str) -> str:
    """A Flux module's block: D00, D01, … (double), S00, … (single), BASE outside the blocks."""
    place = flux_block(name)
    return "BASE" if place is None else f"{place[0][0].upper()}{place[1]:02d}"


def blocks_held(names: Iterable[str], arch: str) -> Optional[tuple[str, list[str]]]:
    """("SDXL" | "Flux", the blocks the modules sit in, in model order) — None for other models."""
    names = list(names)
    if arch == "sdxl":
        specs = sdxl_modules()
        held, order = {specs[n].block for n in names if n in specs}, BLOCKS_20
        model = "SDXL"
    elif flux_naming(names) is not None:
        held, order, model = {flux_block_id(n) for n in names}, FLUX_BLOCKS, "Flux"
    else:
        return None
    return model, [b for b in order if b in held] + sorted(held - set(order))


def block_runs(blocks: Sequence[str]) -> str:
    """'BASE, IN04-IN05, IN07-IN08, MID, OUT00-OUT05': runs of consecutive blocks of one group joined."""
    runs: list[tuple[str, int, list[str]]] = []  # (group, last index, blocks)
    for block in blocks:
        group, digits = _ID.match(block).groups()
        index = int(digits) if digits else None
        if runs and index is not None and runs[-1][0] == group and runs[-1][1] == index - 1:
            runs[-1] = (group, index, runs[-1][2] + [block])
        else:
            runs.append((group, index, [block]))
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for _, _, run in runs)
