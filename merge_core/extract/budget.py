"""A size budget for an extraction (--target-size): phase 1 reads both models and finds each weight's top singular
values with the extraction's own seeded sketch; lowrank.size_budget allocates the ranks; the extraction then
runs with each module's rank (ExtractOptions.ranks), reading the models a second time (about 2× the time)."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..adapters.base import matrix_shape
from ..checkpoint.lora_names import BIAS
from ..device import resolve_device, with_cpu_fallback
from ..errors import MergeCoreError
from ..files.stream_writer import data_offset
from ..lora_stream import ALPHA_BYTES, header_reserve, lora_entries
from ..lowrank import Dense, finite_total, svd_of
from ..lowrank.size_budget import Spectrum, check_room, fit, spectrum
from ..report import Progress
from .engine import Run, task_delta
from .options import OVERSAMPLE, POWER_ITERS, ExtractOptions
from .piece import piece_kind
from .plan import Plan

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


def header_bytes(run: Run, dtype: torch.dtype, title: str) -> int:
    """Bytes before the tensor data of the file the run writes (8 + the header reserved for bound_entries)."""
    reserve = header_reserve(bound_entries(run.plan, run.opts, dtype), run.plan.arch, run.recipe, title)
    return data_offset(reserve)


def extract_spectra(run: Run, width: int, device: torch.device,
                    progress: Progress = None) -> tuple[list[Spectrum], int]:
    """(the spectra of the weights that become LoRAs, the bytes of everything that does not depend on rank)."""
    spectra, fixed, opts = [], 0, run.opts
    for done, task in enumerate(run.plan.tasks, 1):
        delta = with_cpu_fallback(lambda dev, task=task: task_delta(run.base, run.tuned, task, dev), device)
        for tg in task.targets if delta is not None else ():
            d = tg.take(delta).contiguous()
            kind = piece_kind(tg, d, opts)
            out, n = matrix_shape(tuple(d.shape))
            cap = (out * n - 1) // (out + n)  # the largest rank still smaller than ΔW itself
            if kind == "full" or (kind == "lora" and cap < 1):
                fixed += d.numel() * width
            elif kind == "lora":
                rule, op = opts.rule_for(tuple(d.shape)), Dense(d.reshape(out, n))
                s = svd_of(op, "rsvd", rule, opts.seed_for(tg.name), OVERSAMPLE, POWER_ITERS).S
                spectra.append(spectrum(tg.name, s.to("cpu", torch.float64), finite_total(op), (out, n), width,
                                        rule, cap))
                fixed += ALPHA_BYTES
        if progress is not None:
            progress(done, len(run.plan.tasks), task.key)
    return spectra, fixed


def fit_extraction(run: Run, target_bytes: int, dtype: torch.dtype, title: str, device: str = "auto",
                   progress: Progress = None) -> dict:
    """Give every extracted module the rank that keeps the most of Σ‖ΔW‖² in a `dtype` file of ≤ target_bytes
    titled `title` (run.opts get the ranks, the recipe the target); returns the summary."""
    if run.opts.rule.rank is not None:
        raise MergeCoreError("--target-size chooses the ranks: it cannot be combined with a fixed --rank")
    if run.opts.diff_only:
        raise MergeCoreError("--target-size chooses ranks; --diff-only stores every change whole")
    run.recipe["parameters"]["target_size"] = int(target_bytes)
    header = header_bytes(run, dtype, title)
    check_room(target_bytes, header)  # before reading the models
    spectra, fixed = extract_spectra(run, dtype.itemsize, resolve_device(device), progress)
    ranks, summary = fit(spectra, target_bytes, header + fixed, "ΔW = tuned − base")
    run.opts = replace(run.opts, ranks=ranks)
    return summary
