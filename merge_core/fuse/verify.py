"""--verify and --metadata: reload a written fusion and measure each module against the exact target.

Target per module: T = Σ cᵢ ΔWᵢ from the inputs and the coefficients the fusion used (report.extra).
Error: ‖T − Ŵ‖/‖T‖ of the module as read back (so it includes the output dtype's rounding); exact traces for
factored modules, one dense module at a time when the written module is a full diff.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch

from ..device import resolve_device
from ..lora_file import LoraSet, load_lora
from ..lowrank import Dense, Operator, measure, weighted_sum
from ..report import Report
from .terms import Term, dense_sum

F64 = torch.float64


def module_error(terms: Sequence[Term], coeffs: Sequence[float], written: Optional[Operator]) -> float:
    """‖T − Ŵ‖/‖T‖ for T = Σ cᵢ ΔWᵢ (no terms: T = 0; written None: Ŵ = 0)."""
    if not terms:
        return 0.0 if written is None else math.inf
    if not isinstance(written, Dense):
        return measure(weighted_sum([(c, t.op) for c, t in zip(coeffs, terms)]), written).rel_error
    T = dense_sum(terms, coeffs).to(F64)
    norm = float(T.norm())
    diff = float((T - written.W.to(F64)).norm())
    return diff / norm if norm > 0.0 else (0.0 if diff == 0.0 else math.inf)


def verify_written(path: Union[str, os.PathLike], sets: Sequence[LoraSet], report: Report,
                   device: str = "auto") -> dict[str, float]:
    """Per-module relative error of the file at `path` against the exact fused target (the coefficients are the
    fusion's report's)."""
    dev = resolve_device(device)
    written = load_lora(path)
    errors = {}
    for name, cs in report.extra["coefficients"].items():
        present = [(c, Term(i, sets[i].modules[name], dev)) for i, c in enumerate(cs) if name in sets[i].modules]
        pairs = [(c, t) for c, t in present if c != 0.0 and t.has_weight]
        module = written.modules.get(name)
        has = module is not None and getattr(module, "has_weight", True)
        errors[name] = module_error([t for _, t in pairs], [c for c, _ in pairs], module.operator(dev) if has else None)
    return errors


def fusion_metadata(report: Report, recipe: dict, verify: Optional[dict[str, float]] = None) -> dict:
    """The --metadata JSON: recipe (inputs with sha256, weights, strategy, …) and per-module results."""
    coeffs = report.extra.get("coefficients", {})
    rows = []
    for m in report.modules:
        row = {"name": m.name, "kind": m.kind, "rank": m.rank, "params": m.params, "rel_error": m.rel_error,
               "energy_kept": m.energy_kept, "coefficients": coeffs.get(m.name), "note": m.note}
        if verify is not None:
            row["verify_rel_error"] = verify.get(m.name)
        rows.append(row)
    summary = {k: v for k, v in report.as_dict().items() if k not in ("modules", "coefficients")}
    if verify:
        summary["verify_max_rel_error"] = max(verify.values())
    return {"recipe": recipe, "summary": summary, "modules": rows}
