"""What resizing one LoRA would keep (`inspect --ranks`, the LoRA Rank Table node): for a few energy levels and
fixed ranks, the ranks its modules would get, the share of Σ‖ΔW‖² kept and the size of the file — from every
module's exact singular values (the Gram core's, as the size budget finds them), before anything is written.

energy e: kₘ = min{k : Σ_{i≤k} σ²ₘᵢ ≥ e·‖ΔWₘ‖²} (at least 1, at most the non-null σ);
fixed r:  kₘ = min(r, non-null σ) — each chosen by the merge's own rule (rank_select.choose_ranks);
bytes = header + fixed tensors + Σₘ kₘ·(out + in·kh·kw)·width: the file `merge FILE` writes at those ranks
(to within the few header bytes by which its recipe's rank options differ).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..device import resolve_device
from ..lora_file import LoraSet, dtype_of
from ..lowrank import RankRule
from ..lowrank.rank_select import choose_ranks
from ..lowrank.size_budget import Spectrum, kept
from ..report import Progress, size_text
from .budget import fixed_bytes, spectra_of
from .engine import plan_merge

ENERGIES = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
RANKS = (4, 8, 16, 32, 64, 128, 256)
WIDEST = 1 << 16  # a rule with no practical upper bound: every non-null σ is found


def singular_values(spectra: Sequence[Spectrum]) -> torch.Tensor:
    """The modules' non-null σ as rows (fp64, zero-padded to the longest), as choose_ranks takes them."""
    S = torch.zeros(len(spectra), max((len(s.sq) for s in spectra), default=0), dtype=torch.float64)
    for row, s in zip(S, spectra):
        row[:len(s.sq)] = torch.tensor(s.sq, dtype=torch.float64).sqrt()
    return S


def _row(choice: str, spectra: Sequence[Spectrum], ranks: dict[str, int], fixed: int) -> dict:
    chosen = [ranks[s.name] for s in spectra if s.sq]  # an all-zero module is not written
    return {"choice": choice, "min_rank": min(chosen, default=0), "max_rank": max(chosen, default=0),
            "avg_rank": sum(chosen) / len(chosen) if chosen else 0.0, "energy_kept": kept(spectra, ranks),
            "file_bytes": fixed + sum(ranks[s.name] * s.cost for s in spectra)}


def rank_table(lset: LoraSet, energies: Sequence[float] = ENERGIES, dtype: str = "fp16", title: str = "resized",
               device: str = "auto", progress: Progress = None) -> list[dict]:
    """One row per energy level, then per fixed rank up to the largest non-null rank: {choice, min_rank,
    max_rank, avg_rank, energy_kept, file_bytes} (a file of `dtype` titled `title`; DoRA magnitudes left out,
    as `merge --dora ignore` does)."""
    plan = plan_merge([lset], "rsvd", rule=RankRule(energy=1.0, min_rank=1, max_rank=WIDEST), dora="ignore")
    width = dtype_of(dtype).itemsize
    fixed = fixed_bytes(plan, width, dtype, title)
    spectra = spectra_of(plan, width, resolve_device(device), progress)
    S, totals = singular_values(spectra), [s.total for s in spectra]
    top = S.shape[1]  # the most non-null σ of any module
    rules = [(f"energy {e:g}", RankRule(energy=e, min_rank=1, max_rank=WIDEST)) for e in energies]
    rules += [(f"rank {r}", RankRule(rank=r)) for r in sorted({r for r in RANKS if r < top} | {top} - {0})]
    rows = []
    for choice, rule in rules:
        ks = choose_ranks(S, totals, rule, (WIDEST, WIDEST)) if spectra else []
        rows.append(_row(choice, spectra, dict(zip((s.name for s in spectra), ks)), fixed))
    return rows


def table_lines(rows: Sequence[dict]) -> list[str]:
    """rank_table's rows as a text table: choice, ranks (min-max and average), energy kept, file size."""
    lines = [f"{'choice':<14} {'ranks (avg)':<16} {'energy kept':>11} {'fp16 file':>12}"]
    for r in rows:
        span = f"{r['min_rank']}" if r["min_rank"] == r["max_rank"] else f"{r['min_rank']}-{r['max_rank']}"
        ranks = f"{span} ({r['avg_rank']:.1f})"
        lines.append(f"{r['choice']:<14} {ranks:<16} {100 * r['energy_kept']:>10.2f}% {size_text(r['file_bytes']):>12}")
    return lines
