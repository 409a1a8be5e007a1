"""Extract straight into a file.  For .safetensors the entries are written as they are made (header
reserved up front and filled in at the end), so even --diff-only, whose output is as big as a model,
runs in the memory of one layer; .pt output goes through extract_lora + save (torch.save needs it all)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..errors import MergeCoreError
from ..files.atomic import atomic_write, refuse_existing
from ..files.tensor_source import PICKLE_OUTPUTS
from ..lora_file import dtype_of
from ..lora_stream import LoraStream, stream_writer
from ..lowrank.rank_select import RankRule
from ..report import Progress, Report
from .api import extract_lora
from .budget import fit_extraction, header_reserve_of
from .engine import Source, open_run


def extract_to_file(base: Source, tuned: Source, output: Union[str, os.PathLike], output_dtype: str = "bf16",
                    overwrite: bool = False, rule: Optional[RankRule] = None, conv_rank: Optional[int] = None,
                    diff_only: bool = False, min_diff: float = 0.0, text_encoders: bool = True,
                    device: str = "auto", seed: int = 0, progress: Progress = None, base_kind: str = "auto",
                    tuned_kind: str = "auto", target_size: Optional[int] = None) -> Report:
    """extract_lora(...).save(output), streamed for .safetensors; returns the report.  `target_size` (bytes):
    ranks chosen to keep the most of Σ‖ΔW‖² in a file of at most that size (extract/budget.py)."""
    path = Path(output)
    refuse_existing(path, overwrite, (base, tuned))  # before any work
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
        run.report.extra["size_budget"] = fit_extraction(run, int(target_size), dtype, path.stem, device, progress,
                                                         hold=dtype)
    reserve = header_reserve_of(run, dtype, path.stem)

    def fill(stream: LoraStream) -> tuple[str, dict, None]:
        for target, module in run.pieces(device, progress):
            stream.add(target.name, module)
        run.finish(stream.tensor_count)
        return run.plan.arch, run.final_recipe(), None

    atomic_write(path, stream_writer(reserve, dtype, path.stem, fill), overwrite)
    return run.report
