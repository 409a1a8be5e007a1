"""A size budget for an extraction (--target-size): phase 1 reads both models and finds each weight's top singular
values with the extraction's own seeded sketch; lowrank.size_budget allocates the ranks; the extraction then
runs with each module's rank (ExtractOptions.ranks), reading the models a second time (about 2× the time)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..adapters.base import matrix_shape
from ..device import resolve_device, with_cpu_fallback
from ..errors import MergeCoreError
from ..lowrank import Dense, finite_total, svd_of
from ..lowrank.size_budget import Spectrum, fit, spectrum
from ..report import Progress
from .engine import Run, task_delta
from .options import OVERSAMPLE, POWER_ITERS
from .piece import piece_kind

ALPHA_BYTES = 4  # each LoRA module's fp32 alpha


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


def fit_extraction(run: Run, target_bytes: int, width: int, header_bytes: int, device: str = "auto",
                   progress: Progress = None) -> dict:
    """Give every extracted module the rank that keeps the most of Σ‖ΔW‖² in a file of ≤ target_bytes whose
    header takes header_bytes (run.opts get the ranks); returns the summary."""
    if run.opts.rule.rank is not None:
        raise MergeCoreError("--target-size chooses the ranks: it cannot be combined with a fixed --rank")
    if run.opts.diff_only:
        raise MergeCoreError("--target-size chooses ranks; --diff-only stores every change whole")
    if header_bytes >= target_bytes:
        fit([], target_bytes, header_bytes, "")  # the one-line error, before reading the models
    spectra, fixed = extract_spectra(run, width, resolve_device(device), progress)
    ranks, summary = fit(spectra, target_bytes, header_bytes + fixed, "ΔW = tuned − base")
    run.opts = replace(run.opts, ranks=ranks)
    return summary
