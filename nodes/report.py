"""Merge Report: the per-module report of a merge / fuse / extraction as text and as a per-block picture."""
from __future__ import annotations

from .inputs import CATEGORY
from .pack_lora import LORA_TYPE, PackLora, summary_line
from .report_chart import block_stats, render, to_image_tensor


def block_table(stats) -> str:
    lines = [f"{'block':<6} {'modules':>7} {'mean rank':>9} {'min':>4} {'max':>4} {'mean energy':>11} {'lowest':>8}"]
    for block, s in stats.items():
        if not s.ranks and not s.energies:
            continue
        e = s.mean_energy
        lines.append(f"{block:<6} {max(len(s.ranks), len(s.energies)):>7} {s.mean_rank:>9.1f} "
                     f"{min(s.ranks, default=0):>4} {max(s.ranks, default=0):>4} "
                     + (f"{e:>11.5f} {min(s.energies):>8.5f}" if e is not None else f"{'-':>11} {'-':>8}"))
    return "\n".join(lines)


def report_rows(pack: PackLora) -> list[tuple[str, int, object]]:
    """(name, rank, kept energy) per module: from the report when there is one, else ranks from the modules."""
    if pack.report is not None:
        return [(m.name, m.rank, m.energy_kept) for m in pack.report.modules]
    return [(name, m.rank if m.kind != "full" else 0, None) for name, m in pack.lora.modules.items()]


class MergeReport:
    NODE_ID = "LoRArSVD_Report"
    DISPLAY_NAME = "LoRA Merge Report (rSVD Merge)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Shows how a LoRA was made: per SDXL or Flux.1 block the ranks and the kept energy (as text and as a "
                   "picture for Preview Image), and per module rank, parameters, exact relative error and kept "
                   "energy, worst first.")
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("text", "image")
    OUTPUT_TOOLTIPS = ("the report as text", "ranks and kept energy per block, as an image")
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"lora": (LORA_TYPE, {"tooltip": "a LoRA from the pack's nodes"})}}

    def report(self, lora: PackLora) -> dict:
        stats = block_stats(report_rows(lora))
        title = summary_line(lora.report) if lora.report is not None else f"{lora.label}: loaded from a file"
        parts = [title, "", block_table(stats)]
        if lora.report is not None:
            parts += ["", lora.report.table(limit=None)]
        text = "\n".join(parts)
        return {"ui": {"text": [text]}, "result": (text, to_image_tensor(render(stats, title)))}


NODES = (MergeReport,)
