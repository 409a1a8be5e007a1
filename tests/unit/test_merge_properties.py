"""Properties of the merges over generated inputs (hypothesis, derandomized: the same examples on every run):
N = 1..4 LoRAs of ranks 1..10 on one module of shape up to 48×48 (often wider rank than the module allows),
any alphas and signed weights, against dense references in fp64 written here —
concat is the exact weighted sum; a fixed-rank svd/rsvd has exactly the optimal error at that rank (0 once the
rank reaches T's); the energy rule picks the true energy rank; the reported error is the true error (up to
the round-off of fp32 Grams when the weighted terms cancel)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from merge_core.adapters import LoRA
from merge_core.lowrank import RankRule
from merge_core.merge import merge_loras
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import F64, lora_set

NAME = "layer"
PROFILE = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def merges(draw) -> tuple[list, list[float]]:
    """A list of one-module LoRA sets on the same (out, in) and one weight per set."""
    out, inn = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    sets, weights = [], []
    for _ in range(n):
        r = draw(st.integers(1, 10))
        alpha = draw(st.one_of(st.none(), st.floats(0.25, 64.0)))
        scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
        up = torch.randn(out, r, generator=g) * scale
        down = torch.randn(r, inn, generator=g)
        sets.append(lora_set({NAME: LoRA(up, down, alpha)}, arch="other"))
        weights.append(draw(st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 1e-3)))
    return sets, weights


def dense_target(sets: list, weights: list[float]) -> torch.Tensor:
    total = 0
    for s, w in zip(sets, weights):
        m = s.modules[NAME]
        r = m.down.shape[0]
        total = total + w * (1.0 if m.alpha is None else m.alpha / r) * (m.up.to(F64) @ m.down.to(F64))
    return total


def cancellation(sets: list, weights: list[float], T: torch.Tensor) -> float:
    """κ = Σ|wᵢ|‖ΔWᵢ‖ / ‖T‖ (≥ 1; large when the terms cancel).  The report's error comes from fp32 Grams: its
    floor is a small multiple of √ε₃₂·κ ≈ 3e-4·κ (the tail's σ² carry round-off of ε·σ₁²), far below the errors
    of usual energy rules; the factors' own error is checked more tightly."""
    return float(sum(abs(w) * dense_target([s], [1.0]).norm() for s, w in zip(sets, weights)) / T.norm())


def merged_dense(result) -> torch.Tensor:
    m = result.modules[NAME]
    return (m.alpha / m.rank) * (m.up.to(F64) @ m.down.to(F64))


def rel(a: torch.Tensor, T: torch.Tensor) -> float:
    return float((a - T).norm() / T.norm())


@PROFILE
@given(merges())
def test_concat_is_the_exact_weighted_sum(case):
    sets, weights = case
    T = dense_target(sets, weights)
    result = merge_loras(sets, "concat", weights=weights, device="cpu")
    assert result.modules[NAME].rank == sum(s.modules[NAME].rank for s in sets)
    assert rel(merged_dense(result), T) < 1e-5


@PROFILE
@given(merges(), st.integers(1, 12), st.sampled_from(["svd", "rsvd"]))
def test_a_fixed_rank_has_the_optimal_error(case, k, method):
    """Up to fp32's floor: directions with σ below ~√ε₃₂·σ₁ ≈ 3e-4·σ₁ are round-off of fp32 Grams (rsvd's core),
    kept or dropped, so the rank lies between min(k, T's count of σ > 1e-3·σ₁) and min(k, out, in), and the
    error within 5e-4 of the optimum (an fp16 file rounds each entry by up to 5e-4 anyway)."""
    sets, weights = case
    T = dense_target(sets, weights)
    s = torch.linalg.svdvals(T)
    assume(float(s[0]) > 0)
    result = merge_loras(sets, method, weights=weights, rule=RankRule(rank=k), device="cpu")
    rank = result.modules[NAME].rank if NAME in result.modules else 0
    assert min(k, int((s > s[0] * 1e-3).sum())) <= rank <= min(k, *T.shape)
    optimal = math.sqrt(float((s[k:] ** 2).sum() / (s ** 2).sum()))
    error = rel(merged_dense(result), T)
    assert optimal - 1e-6 <= error <= optimal + 5e-4
    assert result.report.modules[0].rel_error == pytest.approx(error, abs=1e-3 * cancellation(sets, weights, T))


@PROFILE
@given(merges(), st.sampled_from([0.5, 0.9, 0.99]), st.integers(1, 3), st.integers(3, 12))
def test_the_energy_rule_keeps_the_true_energy_rank(case, energy, lo, hi):
    sets, weights = case
    T = dense_target(sets, weights)
    s2 = torch.linalg.svdvals(T) ** 2
    assume(float(s2[0]) > 0)
    cum = torch.cumsum(s2, 0) / s2.sum()
    assume(float((cum - energy).abs().min()) > 1e-4)  # no tie at the threshold, where fp32 round-off decides
    wanted = max(int((cum < energy).sum()) + 1, lo)
    reliable = int((s2 > s2[0] * 1e-6).sum())  # σ above 1e-3·σ₁
    result = merge_loras(sets, "rsvd", weights=weights, rule=RankRule(energy=energy, min_rank=lo, max_rank=hi),
                         device="cpu")
    k = result.modules[NAME].rank
    assert min(wanted, hi, reliable) <= k <= min(wanted, hi, *T.shape)  # the floor as in the fixed-rank test
    assert rel(merged_dense(result), T) == pytest.approx(math.sqrt(float(s2[k:].sum() / s2.sum())), abs=5e-4)
