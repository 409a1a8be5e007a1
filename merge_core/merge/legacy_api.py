"""The original scripts' functions (merge_rsvd.py, merge_covention.py), as thin wrappers over merge_loras.

Same names and arguments; the math is the project's (T = w·ΔW₁ + (1−w)·ΔW₂ with each αᵢ/rᵢ applied once,
energy on σ² over the exact ‖T‖², α = rank in the output).  Inputs are read with the caller's suffixes
(`load_lora(path, profile="custom", suffixes=Suffixes(up, down, alpha))`), so PEFT folders of LLM adapters
(".lora_B.weight"/".lora_A.weight", alpha from adapter_config.json) work as before; those are written back as
PEFT folders, everything else with the same suffixes.  Unlike the originals, an existing output is never
replaced unless overwrite=True.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from ..errors import MergeCoreError
from ..keys.suffixes import Suffixes
from ..lora_file import LoraSet, load_lora
from ..lowrank import RankRule
from ..result import MergeResult
from .api import merge_loras
from .methods import METHODS

PathLike = Union[str, os.PathLike]
LEGACY_METHODS = {"M_Concatenate": "concat", "M_Geometric_mean": "geometric_mean", "M_SVD": "svd",
                  "M_Weighted_avg": "weighted_avg"}
WEIGHTED = ("weighted_avg", "rsvd")  # the methods the original weighted by (w, 1 − w); the others add (1, 1)


def _load_pair(path1: PathLike, path2: PathLike, suffixes: Suffixes) -> list[LoraSet]:
    return [load_lora(p, profile="custom", suffixes=suffixes) for p in (path1, path2)]


def _save(result: MergeResult, sets: list[LoraSet], path: Path, suffixes: Suffixes, overwrite: bool) -> Path:
    """PEFT folders back as a PEFT folder; anything else with the caller's suffixes."""
    if all(s.peft_config is not None for s in sets):
        result.profile, result.peft_config = "peft", sets[0].peft_config
    else:
        result.profile, result.suffixes = "custom", suffixes
    return result.save(path, overwrite=overwrite)


def merge_lora_models(lora_path1: PathLike, lora_path2: PathLike, output_filename: PathLike,
                      up_weight_suffix: str = ".lora_up.weight", down_weight_suffix: str = ".lora_down.weight",
                      alpha_suffix: Optional[str] = ".alpha", epsilon: float = 1e-12, min_rank: int = 4,
                      max_rank: int = 32, energy_threshold: float = 0.99, *, overwrite: bool = False) -> Path:
    """rSVD merge of two LoRAs at 0.5/0.5 with dynamic rank; min_rank == max_rank gives a fixed rank.
    `epsilon` is accepted for compatibility and unused: the energy rule divides by the exact ‖T‖², and
    all-zero modules get rank 0."""
    suffixes = Suffixes(up_weight_suffix, down_weight_suffix, alpha_suffix)
    sets = _load_pair(lora_path1, lora_path2, suffixes)
    rule = RankRule(energy=energy_threshold, min_rank=min_rank, max_rank=max_rank)
    result = merge_loras(sets, "rsvd", rule=rule)
    return _save(result, sets, Path(output_filename), suffixes, overwrite)


def _method_names(merge_methods: Union[Mapping[str, object], Iterable[str]]) -> list[tuple[str, str]]:
    """(name as given, our method) for a dict name->anything or a list of names."""
    out = []
    for name in merge_methods:
        method = LEGACY_METHODS.get(name, name)
        if method not in METHODS:
            raise MergeCoreError(f"unknown merge method {name!r}; choose from {', '.join(LEGACY_METHODS)} "
                                 f"or {', '.join(METHODS)}")
        out.append((name, method))
    return out


def merge_lora_adapters_covention(lora_path1: PathLike, lora_path2: PathLike, output_dir: PathLike,
                                  merge_methods: Union[Mapping[str, object], Iterable[str]],
                                  up_weight_suffix: str = ".lora_up.weight",
                                  down_weight_suffix: str = ".lora_down.weight",
                                  alpha_suffix: Optional[str] = ".alpha", merge_weight: float = 0.5, *,
                                  overwrite: bool = False) -> dict[str, Path]:
    """One output per method in `output_dir`, named after the method (M_SVD.safetensors, or a PEFT folder
    M_SVD/ for PEFT inputs).  merge_weight w gives weights (w, 1−w) to M_Weighted_avg (and rsvd); the other
    methods use (1, 1) as the originals did (M_SVD adds the two deltas).  Returns {method name: path}."""
    suffixes = Suffixes(up_weight_suffix, down_weight_suffix, alpha_suffix)
    chosen = _method_names(merge_methods)
    sets = _load_pair(lora_path1, lora_path2, suffixes)
    peft = all(s.peft_config is not None for s in sets)
    written = {}
    for name, method in chosen:
        weights = (merge_weight, 1.0 - merge_weight) if method in WEIGHTED else None
        result = merge_loras(sets, method, weights)
        target = Path(output_dir) / (name if peft else f"{name}.safetensors")
        written[name] = _save(result, sets, target, suffixes, overwrite)
    return written
