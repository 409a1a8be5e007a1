"""Merge straight into the output file: each merged module is cast to the file's tensors on the worker that made
it and written as soon as it and the modules planned before it are done, so the write overlaps the arithmetic
and the merged modules are never all in memory.  Kohya-named .safetensors files, and PEFT layouts (a folder
with adapter_config.json written last, or a PEFT-named .safetensors); .pt files go through merge_loras + save
(torch.save needs everything at once)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from .. import peft_layout
from ..errors import MergeCoreError
from ..files.atomic import atomic_write
from ..files.metadata import DIGEST_PLACEHOLDER
from ..files.stream_writer import Entry
from ..files.tensor_source import PICKLE_OUTPUTS
from ..lora_file import dtype_of, module_state
from ..lora_stream import LoraStream, header_reserve, lora_entries, stream_writer
from ..report import Progress, Report
from .engine import MergePlan, run_merge
from .outcome import Outcome


def writes_folder(path: Union[str, os.PathLike], plan: MergePlan) -> bool:
    """True when `path` names a PEFT adapter folder: PEFT names, and not a file's name (.safetensors, .pt, .pth,
    .ckpt)."""
    return plan.layout[1] == "peft" and Path(path).suffix.lower() not in (".safetensors", *PICKLE_OUTPUTS)


def streams_to(path: Union[str, os.PathLike], plan: MergePlan) -> bool:
    """True when merge_to_file can write this output module by module: a .safetensors file, or a PEFT folder."""
    return Path(path).suffix.lower() == ".safetensors" or writes_folder(path, plan)


def bound_entries(plan: MergePlan, dtype: torch.dtype) -> list[Entry]:
    """Every tensor a merged module may be written with (a superset): LoRA factors up to full rank, and alpha,
    an exact vector sum's diff and the bias delta (kohya names), or PEFT's names."""
    out: list[Entry] = []
    peft, embeddings, biases = plan.layout[1] == "peft", plan.peft_embeddings(), plan.peft_biases()
    for t in plan.targets():
        shape = t.weight_shape
        if not t.vector_only:
            kohya = lora_entries(t.name, shape, min(t.matrix_shape), dtype)
            out += (peft_layout.module_entries(t.name, kohya[0][2], kohya[1][2], dtype, t.name in embeddings, biases)
                    if peft else kohya)
        elif shape and not peft:
            out.append((t.name + ".diff", dtype, shape))
        if t.bias_shape is not None and not peft:
            out.append((t.name + ".diff_b", dtype, t.bias_shape))
    return out


def header_reserve_for(plan: MergePlan, dtype: str, title: str) -> int:
    """The header bytes merge_to_file reserves for `plan` written in `dtype` under `title` (a bound on any
    module's tensors at full rank, the metadata, and a recipe with the inputs' hashes)."""
    plan.parameters["dtype"] = dtype
    bound_recipe = plan.recipe(digests=[DIGEST_PLACEHOLDER] * len(plan.sets))
    return header_reserve(bound_entries(plan, dtype_of(dtype)), plan.layout[0], bound_recipe, title, plan.carried())


def merge_to_file(plan: MergePlan, output: Union[str, os.PathLike], dtype: str = "fp16", overwrite: bool = False,
                  device: str = "auto", progress: Progress = None) -> Report:
    """Run `plan` (from plan_merge) into `output` (see streams_to), atomically; returns the report."""
    path = Path(output)
    if not streams_to(path, plan):
        raise MergeCoreError(f"merge_to_file writes .safetensors files and PEFT folders, not {path.name}")
    dt = dtype_of(dtype)
    arch, profile, peft_config = plan.layout
    carried = plan.carried()
    reserve = header_reserve_for(plan, dtype, path.stem)
    embeddings, biases = plan.peft_embeddings(), plan.peft_biases()
    ranks: dict[str, int] = {}
    report: Optional[Report] = None

    def prepare(name: str, out: Outcome) -> Optional[dict[str, torch.Tensor]]:  # on the worker thread
        if out.module is None:
            return None
        if profile != "peft":
            return module_state(name, out.module, dt)
        ranks.update(peft_layout.ranks_of({name: out.module}))  # refuses what PEFT cannot hold
        return peft_layout.module_tensors(name, out.module, dt, embeddings, biases)

    def fill(stream: LoraStream) -> tuple[str, dict, dict]:
        nonlocal report

        def sink(name: str, out: Outcome, tensors: Optional[dict[str, torch.Tensor]]) -> None:
            if out.module is not None:
                stream.add(name, out.module, tensors)

        report = run_merge(plan, sink, device, progress, prepare)
        return arch, plan.recipe(), carried

    write_file = stream_writer(reserve, dt, path.stem, fill)
    if writes_folder(path, plan):
        peft_layout.write_folder(path, write_file, lambda: peft_layout.config_for(ranks, peft_config, biases),
                                 overwrite)
    else:
        atomic_write(path, write_file, overwrite)
    return report
