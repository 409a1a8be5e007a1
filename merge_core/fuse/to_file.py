"""Fuse straight into a .safetensors file: each module is cast to the file's tensors on the worker that fused it
and written once it and the modules before it are done, so the fused modules are never all in memory (a
`full` fusion of SDXL holds 2.9 G values).  .pt outputs go through fuse_models + save."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from ..adapters.base import matrix_shape
from ..errors import MergeCoreError
from ..files.atomic import atomic_write
from ..files.metadata import DIGEST_PLACEHOLDER
from ..files.stream_writer import Entry
from ..lora_file import dtype_of, module_state
from ..lora_stream import LoraStream, header_reserve, lora_entries, stream_writer
from ..report import Progress, Report
from .engine import FusePlan, run_fuse

LOKR_FACTORS = (".lokr_w1", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")


def bound_entries(plan: FusePlan, dtype: torch.dtype) -> list[Entry]:
    """Every tensor a fused module may be written with (a superset, for the header reserve): by the output form,
    the full diff, LoRA factors up to full rank, LoKr factors (each bounded by the weight's largest side), and
    the bias delta."""
    out: list[Entry] = []
    for name in plan.names:
        modules = [s.modules[name] for s in plan.sets if name in s.modules]
        shape = next((m.weight_shape for m in modules if getattr(m, "has_weight", True)), None)
        if shape is not None:
            if plan.output_format == "full":
                out.append((name + ".diff", dtype, shape))
            else:
                out += lora_entries(name, shape, min(matrix_shape(shape)), dtype)
            if plan.output_format in ("lokr", "auto"):
                side = (max(shape),) * len(shape)
                out += [(name + suffix, dtype, side) for suffix in LOKR_FACTORS]
        bias = next((m.diff_b for m in modules if m.diff_b is not None), None)
        if bias is not None:
            out.append((name + ".diff_b", dtype, tuple(bias.shape)))
    return out


def fuse_to_file(plan: FusePlan, output: Union[str, os.PathLike], dtype: str = "float16", overwrite: bool = False,
                 device: str = "auto", progress: Progress = None) -> Report:
    """Run `plan` (from plan_fuse) into the .safetensors file `output`, atomically; returns the report."""
    path = Path(output)
    if path.suffix.lower() != ".safetensors":
        raise MergeCoreError(f"fuse_to_file writes .safetensors files, not {path.name}")
    dt = dtype_of(dtype)
    plan.dtype = dtype
    carried = plan.carried()
    reserve = header_reserve(bound_entries(plan, dt), plan.arch, plan.recipe([DIGEST_PLACEHOLDER] * len(plan.sets)),
                             path.stem, carried)
    report = None

    def fill(stream: LoraStream) -> tuple[str, dict, dict]:
        nonlocal report
        report = run_fuse(plan, lambda name, built, tensors: None if built.module is None else
                          stream.add(name, built.module, tensors), device, progress,
                          lambda name, built: module_state(name, built.module, dt))
        return plan.arch, plan.recipe(), carried

    atomic_write(path, stream_writer(reserve, dt, path.stem, fill), overwrite)
    return report
