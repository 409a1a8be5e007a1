"""The per-block picture of a merge report: rank and kept energy per SDXL or Flux.1 block (LBW groups), drawn with PIL
into a ComfyUI IMAGE tensor [1, H, W, 3] in 0..1."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from merge_core.keys.blocks import BLOCKS_20, FLUX_BLOCKS, flux_block_id
from merge_core.keys.flux_names import flux_naming
from merge_core.keys.sdxl_table import block_of

WIDTH, HEIGHT = 1024, 560
MARGIN_LEFT, MARGIN_RIGHT = 64, 16
LABEL_WIDTH = 30  # pixels a block label or a bar's value needs
BAR, ACCENT, GRID, TEXT, BACKGROUND = (90, 130, 200), (220, 90, 60), (215, 215, 215), (30, 30, 30), (255, 255, 255)


@dataclass
class BlockStats:
    """Ranks and kept energies of one block's modules."""

    ranks: list[int] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)

    @property
    def mean_rank(self) -> float:
        return sum(self.ranks) / len(self.ranks) if self.ranks else 0.0

    @property
    def mean_energy(self) -> Optional[float]:
        return sum(self.energies) / len(self.energies) if self.energies else None


def group_of(name: str, flux: bool = False) -> str:
    """SDXL LBW block (BASE = text encoders, IN00..IN08, MID, OUT00..OUT08); for a Flux LoRA (`flux`) its block
    (D00.., S00..; BASE outside the blocks); else the model part."""
    block = block_of(name)
    if block is not None:
        return block
    if flux:
        return flux_block_id(name)
    return "te" if name.startswith("lora_te") else "unet" if name.startswith("lora_unet") else "other"


def block_stats(rows: Iterable[tuple[str, int, Optional[float]]]) -> dict[str, BlockStats]:
    """(name, rank, kept energy or None) per module -> stats per block, SDXL's or Flux.1's blocks in model order."""
    rows = list(rows)
    flux = flux_naming(name for name, _, _ in rows) is not None
    stats: dict[str, BlockStats] = {}
    for name, rank, energy in rows:
        s = stats.setdefault(group_of(name, flux), BlockStats())
        if rank > 0:
            s.ranks.append(rank)
        if energy is not None and math.isfinite(energy):
            s.energies.append(energy)
    for order in (BLOCKS_20, FLUX_BLOCKS):
        if set(stats) <= set(order):
            return {b: stats.get(b, BlockStats()) for b in order}
    return dict(sorted(stats.items()))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _panel(draw: ImageDraw.ImageDraw, top: int, height: int, title: str, labels: list[str],
           values: list[Optional[float]], lows: list[Optional[float]], lo: float, hi: float, fmt: str) -> None:
    """Bars of `values` in [lo, hi] with a marker at `lows` (the block's minimum), a grid and labels."""
    font, small = _font(15), _font(11)
    draw.text((MARGIN_LEFT, top), title, fill=TEXT, font=font)
    y0, y1 = top + 24, top + height - 20
    x0, x1 = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    span = (hi - lo) or 1.0

    def y_of(v: float) -> float:
        return y1 - (min(max(v, lo), hi) - lo) / span * (y1 - y0)

    for k in range(5):
        v = lo + span * k / 4
        y = y_of(v)
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((4, y - 6), format(v, fmt), fill=TEXT, font=small)
    step = (x1 - x0) / max(len(labels), 1)
    label_every = math.ceil(LABEL_WIDTH / step)  # Flux's 58 blocks: every other label, no values over the bars
    for i, (label, value, low) in enumerate(zip(labels, values, lows)):
        left = x0 + i * step + step * 0.15
        right = x0 + (i + 1) * step - step * 0.15
        if value is not None:
            draw.rectangle([left, y_of(value), right, y1], fill=BAR)
            if label_every == 1:
                draw.text((left, y_of(value) - 13), format(value, fmt), fill=TEXT, font=small)
        if low is not None:
            draw.line([(left, y_of(low)), (right, y_of(low))], fill=ACCENT, width=2)
        if i % label_every == 0:
            draw.text((left, y1 + 3), label, fill=TEXT, font=small)


def render(stats: dict[str, BlockStats], title: str) -> Image.Image:
    """Two panels: mean rank per block (red: smallest), mean kept energy per block (red: lowest)."""
    img = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN_LEFT, 8), title, fill=TEXT, font=_font(16))
    labels = list(stats)
    ranks = [s.mean_rank if s.ranks else None for s in stats.values()]
    max_rank = max([max(s.ranks) for s in stats.values() if s.ranks] + [1])
    _panel(draw, 36, 250, "rank per block (bar: mean, red: smallest)", labels, ranks,
           [min(s.ranks) if s.ranks else None for s in stats.values()], 0.0, float(max_rank), ".0f")
    energies = [s.mean_energy for s in stats.values()]
    known = [min(s.energies) for s in stats.values() if s.energies]
    if known:
        lo = min(0.9, math.floor(min(known) * 100) / 100)
        _panel(draw, 296, 250, "kept energy per block (bar: mean, red: lowest module)", labels, energies,
               [min(s.energies) if s.energies else None for s in stats.values()], lo, 1.0, ".3f")
    else:
        draw.text((MARGIN_LEFT, 300), "kept energy: not known (this LoRA was loaded from a file, not made by a "
                                      "merge, fuse or extraction)", fill=TEXT, font=_font(15))
    return img


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE [1, H, W, 3] float32 in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
