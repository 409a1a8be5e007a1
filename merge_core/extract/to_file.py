"""Extract straight into a file.  For .safetensors the entries are written as they are made (header
reserved up front and filled in at the end), so even --diff-only, whose output is as big as a model,
runs in the memory of one layer; .pt output goes through extract_lora + save (torch.save needs it all)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint.lora_names import BIAS
from ..errors import MergeCoreError
from ..files.atomic import atomic_write, refuse_existing
from ..lora_file import dtype_of
from ..lora_stream import LoraStream, header_reserve, lora_entries
from ..lowrank.rank_select import RankRule
from ..report import Progress, Report
from .budget import fit_extraction
from .engine import Source, extract_lora, open_run
from .options import ExtractOptions
from .plan import Plan

PICKLE_OUTPUTS = (".pt", ".pth", ".ckpt")


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


def extract_to_file(base: Source, tuned: Source, output: Union[str, os.PathLike], output_dtype: str = "bf16",
                    overwrite: bool = False, rule: Optional[RankRule] = None, conv_rank: Optional[int] = None,
                    diff_only: bool = False, min_diff: float = 0.0, text_encoders: bool = True,
                    device: str = "auto", seed: int = 0, progress: Progress = None, base_kind: str = "auto",
                    tuned_kind: str = "auto", target_size: Optional[int] = None) -> Report:
    """extract_lora(...).save(output), streamed for .safetensors; returns the report.  `target_size` (bytes):
    ranks chosen to keep the most of Σ‖ΔW‖² in a file of at most that size (extract/budget.py)."""
    path = Path(output)
    refuse_existing(path, overwrite)  # before any work
    if target_size is not None and path.suffix.lower() in PICKLE_OUTPUTS:
        raise MergeCoreError(f"--target-size sizes a .safetensors file, not {path.name}")
    args = dict(rule=rule, conv_rank=conv_rank, diff_only=diff_only, min_diff=min_diff, text_encoders=text_encoders,
                seed=seed)
    if path.suffix.lower() in PICKLE_OUTPUTS:
        result = extract_lora(base, tuned, device=device, progress=progress, base_kind=base_kind,
                              tuned_kind=tuned_kind, **args)
        result.save(path, output_dtype, overwrite)
        return result.report
    dtype = dtype_of(output_dtype)
    run = open_run(base, tuned, base_kind=base_kind, tuned_kind=tuned_kind, **args)
    if target_size is not None:
        run.recipe["parameters"]["target_size"] = int(target_size)
    reserve = header_reserve(bound_entries(run.plan, run.opts, dtype), run.plan.arch, run.recipe, path.stem)
    if target_size is not None:
        run.report.extra["size_budget"] = fit_extraction(run, int(target_size), dtype.itemsize,
                                                         8 + -(-reserve // 8) * 8, device, progress)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            stream = LoraStream(fh, reserve, dtype)
            for target, module in run.pieces(device, progress):
                stream.add(target.name, module)
            run.finish(stream.tensor_count)
            stream.finish(run.plan.arch, run.recipe, path.stem)

    atomic_write(path, write, overwrite)
    return run.report
