"""A size budget for an extraction (--target-size), in one read of the models: phase 1 makes every entry, each
weight's at the largest rank its rule allows (the extraction's own seeded rSVD; factors held on the CPU in the
output dtype, as a LoRA of that rank would take); lowrank.size_budget allocates the ranks from their singular
values; phase 2 truncates each to its rank (quality from σ, quality.truncated)."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch

from ..adapters import parameter_count
from ..adapters.base import matrix_shape
from ..checkpoint.lora_names import BIAS, Target
from ..device import COMPUTE_DTYPE, resolve_device
from ..errors import MergeCoreError
from ..files.stream_writer import data_offset
from ..lora_stream import ALPHA_BYTES, header_reserve, lora_entries
from ..lowrank import Dense, finite_total, svd_of
from ..lowrank.quality import truncated
from ..lowrank.size_budget import Spectrum, check_room, fit, spectrum
from ..report import Progress
from .engine import Run, TaskResult, task_results
from .options import OVERSAMPLE, POWER_ITERS, ExtractOptions
from .piece import full_piece, lora_piece, piece_kind
from .plan import Plan


@dataclass(frozen=True)
class Sketched:
    """Phase 1's LoRA of one weight: factors at rank spec.high (up out×high, down high×in·kh·kw) and its spectrum."""

    target: Target
    shape: tuple[int, ...]
    up: torch.Tensor
    down: torch.Tensor
    S: torch.Tensor
    spec: Spectrum

    def at(self, k: int):
        """The entry and report row of the rank-k truncation."""
        return lora_piece(self.target, self.shape, self.up[:, :k], self.down[:k], truncated(self.S, k, self.spec.total))


def sketch_piece(target: Target, delta: torch.Tensor, opts: ExtractOptions, width: int, hold: torch.dtype):
    """Phase 1 of one target: None (unchanged), a whole entry (a bias, a 1-D weight, or one no rank would make
    smaller), or a Sketched LoRA."""
    kind = piece_kind(target, delta, opts)
    if kind is None:
        return None
    shape = tuple(delta.shape)
    out, n = matrix_shape(shape)
    cap = (out * n - 1) // (out + n)  # the largest rank still smaller than ΔW itself
    if kind == "full" or cap < 1:
        return full_piece(target, delta, "" if kind == "full" else "full diff: no rank would be smaller")
    rule, op = opts.rule_for(shape), Dense(delta.reshape(out, n))
    total = finite_total(op)
    svd = svd_of(op, "rsvd", rule, opts.seed_for(target.name), OVERSAMPLE, POWER_ITERS)
    S = svd.S.to("cpu", torch.float64)
    spec = spectrum(target.name, S, total, (out, n), width, rule, cap)
    up, down = svd.split_factors(spec.high)
    return Sketched(target, shape, up.to("cpu", hold), down.to("cpu", hold), S, spec)


def bound_entries(plan: Plan, opts: ExtractOptions, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple]]:
    """Every tensor the run may write (a superset): for a weight, both its LoRA factors at the largest rank
    the rule allows and its full `.diff`; `.diff_b` for a bias.  Sizes the header reserve."""
    out = []
    for task in plan.tasks:
        for t in task.targets:
            shape = t.part_shape(task.shape)
            if t.role == BIAS:
                out.append((t.name + ".diff_b", dtype, shape))
                continue
            out.append((t.name + ".diff", dtype, shape))
            if len(shape) >= 2 and not opts.diff_only:
                k = min(shape[0], math.prod(shape[1:]), opts.rule_for(shape).sketch_rank)
                out += lora_entries(t.name, shape, k, dtype)
    return out


def header_reserve_of(run: Run, dtype: torch.dtype, title: str) -> int:
    """The header bytes extract_to_file reserves for the run written in `dtype` under `title` (bound_entries,
    the metadata and the run's recipe)."""
    return header_reserve(bound_entries(run.plan, run.opts, dtype), run.plan.arch, run.recipe, title)


def sketch_all(run: Run, width: int, hold: torch.dtype, device: torch.device,
               progress: Progress = None) -> tuple[deque[TaskResult], list[Spectrum], int]:
    """Phase 1: (every task's entries, Sketched for the LoRAs; their spectra; the bytes of everything else)."""
    made = deque(task_results(run.base, run.tuned, run.plan, run.opts, device,
                              partial(sketch_piece, width=width, hold=hold), progress))
    spectra, fixed = [], 0
    for _, pieces in made:
        for _, piece in pieces or []:
            if isinstance(piece, Sketched):
                spectra.append(piece.spec)
                fixed += ALPHA_BYTES
            elif piece is not None:
                fixed += parameter_count(piece[0]) * width
    return made, spectra, fixed


def truncated_all(made: deque[TaskResult], ranks: dict[str, int]) -> Iterator[TaskResult]:
    """Phase 2: each Sketched cut to its allocated rank, releasing phase 1's entries as they are taken."""
    while made:
        task, pieces = made.popleft()
        yield task, None if pieces is None else [
            (tg, p.at(ranks[tg.name]) if isinstance(p, Sketched) else p) for tg, p in pieces]


def fit_extraction(run: Run, target_bytes: int, dtype: torch.dtype, title: str, device: str = "auto",
                   progress: Progress = None, hold: Optional[torch.dtype] = None) -> dict:
    """Give every extracted module the rank that keeps the most of Σ‖ΔW‖² in a `dtype` file of ≤ target_bytes
    titled `title`; run.pieces() then yields them without reading the models again (factors held in `hold`,
    default fp32), and the recipe records the target.  Returns the summary."""
    if run.opts.diff_only:
        raise MergeCoreError("--target-size chooses ranks; --diff-only stores every change whole")
    if run.opts.rule.rank is not None:
        raise MergeCoreError("--target-size chooses the ranks: it cannot be combined with a fixed --rank")
    run.recipe["parameters"]["target_size"] = int(target_bytes)
    header = data_offset(header_reserve_of(run, dtype, title))  # the bytes before the tensor data
    check_room(target_bytes, header)  # before reading the models
    made, spectra, fixed = sketch_all(run, dtype.itemsize, hold or COMPUTE_DTYPE, resolve_device(device), progress)
    ranks, summary = fit(spectra, target_bytes, header + fixed, "ΔW = tuned − base")
    run.prepared = truncated_all(made, ranks)
    return summary
