"""Write the fused delta T = Σ cᵢ ΔWᵢ of one module in the requested form.

- full: `.diff` = T, dense and exact (large).
- lora: T's exact factored form (LoHa via face-splitting, LoKr via kron(w1, w2a)·kron(I, w2b)) truncated by
  exact SVD under the rank rule (the Gram core with fp64 Grams; a dense T by full SVD); α = rank (scale 1).
- lokr: the nearest Kronecker product kron(w1, w2) (needs LoKr inputs of one factor shape); w2 truncated to
  the inputs' largest w2 rank when all inputs factorised w2, else stored full.  α = w2's rank, so ComfyUI's
  scale α/dim is 1 (and 1 by rule when w2 is full: both factors full).
- auto: lokr where it keeps ≥ 99.9 % of ‖T‖², else lora under the rank rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..adapters import AdapterModule, FullDiff, LoKr, LoRA, parameter_count
from ..errors import MergeCoreError
from ..lowrank import Factored, RankRule, low_rank, weighted_sum
from ..lowrank.gram_core import gram_low_rank
from ..report import ModuleReport
from .kron_nearest import KronFit, nearest_kron
from .terms import Term, dense_sum, kron_compatible

OUTPUT_FORMATS = ("auto", "lokr", "lora", "full")
AUTO_LOKR_ENERGY = 0.999
FALLBACK_NOTE = "lokr fallback to lora"


@dataclass(frozen=True)
class Built:
    module: Optional[AdapterModule]  # None: T = 0, nothing to write
    row: ModuleReport


def check_output_format(form: str) -> None:
    if form not in OUTPUT_FORMATS:
        raise MergeCoreError(f"unknown output format {form!r}; choose one of {', '.join(OUTPUT_FORMATS)}")


def lokr_mismatch(terms: Sequence[Term]) -> Optional[str]:
    """Why the inputs cannot give a LoKr (None when they can): all LoKr with equal w1 and w2 shapes."""
    other = next((t for t in terms if t.kron is None), None)
    if other is not None:
        return f"input {other.index + 1} is {other.module.kind}, not lokr"
    odd = next((t for t in terms[1:] if not kron_compatible(terms[0], t)), None)
    if odd is not None:
        (a, b), (c, d) = terms[0].kron.shapes
        (e, f), (g, h) = odd.kron.shapes
        return (f"factor shapes differ: input {terms[0].index + 1} w1 {a}x{b} w2 {c}x{d}, "
                f"input {odd.index + 1} w1 {e}x{f} w2 {g}x{h}")
    return None


def fused_bias(terms: Sequence[Term], coeffs: Sequence[float]) -> Optional[torch.Tensor]:
    """Σ cᵢ diff_bᵢ over the inputs that carry a bias delta (None when none does)."""
    biases = [(c, t.module.diff_b) for c, t in zip(coeffs, terms) if t.module.diff_b is not None]
    return sum(c * b.float() for c, b in biases) if biases else None


def fit_lokr(terms: Sequence[Term], coeffs: Sequence[float]) -> Optional[KronFit]:
    parts = [t.kron for t in terms]
    ranks = [p.w2_rank for p in parts]
    w2_rank = None if None in ranks else max(ranks)
    return nearest_kron(coeffs, parts, w2_rank)


def lokr_module(fit: KronFit, terms: Sequence[Term], weight_shape: tuple[int, ...],
                bias: Optional[torch.Tensor]) -> LoKr:
    w1 = fit.w1.cpu().contiguous()
    hint = dict(diff_b=bias, shape_hint=weight_shape)
    if fit.w2_full is not None:
        w2 = fit.w2_full.reshape(terms[0].kron.w2_shape).cpu().contiguous()
        return LoKr(w1=w1, w2=w2, **hint)
    return LoKr(w1=w1, w2a=fit.w2_up.cpu().contiguous(), w2b=fit.w2_down.cpu().contiguous(),
                alpha=float(fit.w2_rank), **hint)


def build_module(form: str, name: str, ts: Sequence[Term], cs: Sequence[float], rule: RankRule,
                 bias: Optional[torch.Tensor] = None, note: str = "") -> Built:
    """The module to write for T = Σ cᵢ ΔWᵢ (terms `ts` with weight deltas, coefficients `cs`) in `form`,
    with its exact report row; `bias` is the fused bias delta, if any."""
    notes = [note] if note else []
    if not ts:
        return _row(name, FullDiff(None, diff_b=bias), 0.0, 1.0, notes + ["bias only"])
    shape = ts[0].module.weight_shape
    if form == "full":
        return _full(name, cs, ts, shape, bias, notes)
    if form in ("lokr", "auto"):
        reason = lokr_mismatch(ts)
        if reason is None:
            fit = fit_lokr(ts, cs)
            if fit is None:
                return _row(name, None, 0.0, 1.0, notes + ["all-zero delta: left out"])
            kept = f"nearest kron keeps {100 * fit.nearest_energy:.3f}%"
            if form == "lokr" or fit.quality.energy_kept >= AUTO_LOKR_ENERGY:
                return _row(name, lokr_module(fit, ts, shape, bias), fit.quality.rel_error,
                            fit.quality.energy_kept, notes + [kept])
            notes.append(f"{kept} < {100 * AUTO_LOKR_ENERGY:g}%: lora")
        elif form == "lokr":
            notes.append(f"{FALLBACK_NOTE}: {reason}")
    return _lora(name, cs, ts, shape, bias, rule, notes)


def _full(name: str, cs, ts, shape, bias, notes) -> Built:
    diff = dense_sum(ts, cs).reshape(shape).cpu().contiguous()
    if not bool(diff.any()):
        return _row(name, None, 0.0, 1.0, notes + ["all-zero delta: left out"])
    return _row(name, FullDiff(diff, diff_b=bias), 0.0, 1.0, notes)


def _lora(name: str, cs, ts, shape, bias, rule: RankRule, notes) -> Built:
    op = weighted_sum([(c, t.op) for c, t in zip(cs, ts)])
    lr = gram_low_rank(op, rule, torch.float64) if isinstance(op, Factored) else low_rank(op, rule, solver="exact")
    if lr.rank == 0:
        return _row(name, None, 0.0, 1.0, notes + ["all-zero delta: left out"])
    module = LoRA.from_factors(lr.up.cpu(), lr.down.cpu(), shape, diff_b=bias)
    return _row(name, module, lr.quality.rel_error, lr.quality.energy_kept, notes)


def _row(name: str, module: Optional[AdapterModule], rel_error: float, energy: float, notes) -> Built:
    kind = module.kind if module is not None else "-"
    rank = module.rank if module is not None else 0
    params = parameter_count(module) if module is not None else 0
    return Built(module, ModuleReport(name, kind, rank, params, rel_error, energy, "; ".join(notes)))
