"""Merge straight into a .safetensors file: each merged module is cast to the file's tensors on the worker that
made it and written as soon as it and the modules planned before it are done, so the write overlaps the
arithmetic and the merged modules are never all in memory.  .pt files and PEFT layouts go through
merge_loras + save (torch.save and the PEFT folder writer need everything at once)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import MergeCoreError
from ..files.atomic import atomic_write
from ..files.stream_writer import Entry
from ..lora_file import dtype_of
from ..lora_stream import LoraStream, file_tensors, header_reserve, lora_entries
from ..report import Progress, Report
from .engine import MergePlan, run_merge
from .outcome import Outcome
from .targets import ModuleTarget

DIGEST_PLACEHOLDER = "0" * 64  # a sha256's length, to size the header before the inputs' hashes are known


def streams_to(path: Union[str, os.PathLike], plan: MergePlan) -> bool:
    """True when merge_to_file can write this output module by module (.safetensors, kohya names)."""
    return Path(path).suffix.lower() == ".safetensors" and plan.layout[1] != "peft"


def bound_entries(targets: list[ModuleTarget], dtype: torch.dtype) -> list[Entry]:
    """Every tensor a merged module may be written with (a superset): LoRA factors up to full rank and alpha
    (an exact vector sum: its diff), and the bias delta when an input has one."""
    out: list[Entry] = []
    for t in targets:
        shape = t.weight_shape
        if not t.vector_only:
            out += lora_entries(t.name, shape, min(t.matrix_shape), dtype)
        elif shape:
            out.append((t.name + ".diff", dtype, shape))
        bias = next((x.module.diff_b.shape for x in t.terms if x.module.diff_b is not None), None)
        if bias is not None:
            out.append((t.name + ".diff_b", dtype, tuple(bias)))
    return out


def header_reserve_for(plan: MergePlan, dtype: str, title: str) -> int:
    """The header bytes merge_to_file reserves for `plan` written in `dtype` under `title` (a bound on any
    module's tensors at full rank, the metadata, and a recipe with the inputs' hashes)."""
    plan.parameters["dtype"] = dtype
    bound_recipe = plan.recipe(digests=[DIGEST_PLACEHOLDER] * len(plan.sets))
    return header_reserve(bound_entries(plan.targets(), dtype_of(dtype)), plan.layout[0], bound_recipe, title,
                          plan.carried())


def merge_to_file(plan: MergePlan, output: Union[str, os.PathLike], dtype: str = "fp16", overwrite: bool = False,
                  device: str = "auto", progress: Progress = None) -> Report:
    """Run `plan` (from plan_merge) into the .safetensors file `output`, atomically; returns the report."""
    path = Path(output)
    if not streams_to(path, plan):
        raise MergeCoreError(f"merge_to_file writes kohya-named .safetensors only, not {path.name}")
    dt = dtype_of(dtype)
    arch = plan.layout[0]
    carried = plan.carried()
    reserve = header_reserve_for(plan, dtype, path.stem)
    report: Optional[Report] = None

    def write(tmp: Path) -> None:
        nonlocal report
        with open(tmp, "wb") as fh:
            stream = LoraStream(fh, reserve, dt)

            def prepare(name: str, out: Outcome) -> Optional[dict[str, torch.Tensor]]:  # on the worker thread
                return file_tensors(name, out.module, dt) if out.module is not None else None

            def sink(name: str, out: Outcome, tensors: Optional[dict[str, torch.Tensor]]) -> None:
                if out.module is not None:
                    stream.add(name, out.module, tensors)

            report = run_merge(plan, sink, device, progress, prepare)
            if stream.tensor_count == 0:
                raise MergeCoreError("nothing to write: the result has no modules")
            stream.finish(arch, plan.recipe(), path.stem, carried)

    atomic_write(path, write, overwrite)
    return report
