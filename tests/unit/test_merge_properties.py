"""Properties of the merges and fusion over generated inputs (hypothesis, derandomized: the same examples on
every run): N = 1..4 inputs of ranks 1..10 on one module of shape up to 48×48 (often a wider rank than the
module allows), any alphas and signed weights, against dense references in fp64 written here — concat is the
exact weighted sum; a fixed-rank svd/rsvd has the optimal error at that rank (0 once the rank reaches T's); the
energy rule picks the true energy rank; the reported error is the true error (up to the round-off of fp32
Grams when the weighted terms cancel); TIES/DARE at density 1 give back one input; fuse's weighted_sum of any
mix of LoRA, LoHa and LoKr (w2 full or factorised) is exact as a full diff and as a LoRA; any subset of a fused
Flux weight's diffusers parts joins into its exact row-block delta."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from merge_core.adapters import LoHa, LoKr, LoRA
from merge_core.fuse import fuse_models
from merge_core.lowrank import RankRule
from merge_core.merge import merge_loras
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import F64, dense, lora_set

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
    return sum(w * dense_lycoris(s.modules[NAME]) for s, w in zip(sets, weights))


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


@PROFILE
@given(merges(), st.sampled_from(["ties", "dare", "dare_ties"]), st.integers(0, 2**16))
def test_at_density_one_ties_and_dare_keep_the_sum_of_one_input(case, method, seed):
    """One input at density 1: nothing is trimmed or dropped, no sign conflict exists, so T comes back — exactly,
    with a rule that keeps every singular value."""
    sets, weights = case
    sets, weights = sets[:1], weights[:1]
    T = dense_target(sets, weights)
    assume(float(T.norm()) > 0)
    result = merge_loras(sets, method, weights=weights, density=1.0, seed=seed, device="cpu",
                         rule=RankRule(energy=1.0, min_rank=1, max_rank=64))
    assert rel(merged_dense(result), T) < 5e-4


@st.composite
def lycoris(draw, out_in: tuple[int, int], g: torch.Generator):
    """A LoHa or LoKr (w2 factorised or not) of matrix shape out_in, or a LoRA, with random factors."""
    out, inn = out_in
    kind = draw(st.sampled_from(["lora", "loha", "lokr"]))
    r = draw(st.integers(1, 4))
    alpha = draw(st.one_of(st.none(), st.floats(0.5, 16.0)))
    if kind == "lora":
        return LoRA(torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g), alpha)
    if kind == "loha":
        return LoHa(*(torch.randn(*shape, generator=g) for shape in ((out, r), (r, inn), (out, r), (r, inn))), alpha)
    a, c = draw(st.sampled_from([d for d in range(1, out + 1) if out % d == 0])), \
        draw(st.sampled_from([d for d in range(1, inn + 1) if inn % d == 0]))
    w1 = torch.randn(a, c, generator=g)
    if draw(st.booleans()):
        return LoKr(w1=w1, w2=torch.randn(out // a, inn // c, generator=g))
    return LoKr(w1=w1, w2a=torch.randn(out // a, r, generator=g), w2b=torch.randn(r, inn // c, generator=g),
                alpha=alpha)


def dense_lycoris(m) -> torch.Tensor:
    """ΔW of a LoRA/LoHa/LoKr from its factors, fp64, written out here (scale α/r; LoKr full-full: 1)."""
    d = lambda t: t.to(F64)  # noqa: E731
    if isinstance(m, LoRA):
        return dense(m)
    if isinstance(m, LoHa):
        r = m.w1b.shape[0]
        return (1.0 if m.alpha is None else m.alpha / r) * (d(m.w1a) @ d(m.w1b)) * (d(m.w2a) @ d(m.w2b))
    if m.w2 is not None:
        return torch.kron(d(m.w1), d(m.w2))
    r = m.w2b.shape[0]
    return (1.0 if m.alpha is None else m.alpha / r) * torch.kron(d(m.w1), d(m.w2a) @ d(m.w2b))


@PROFILE
@given(st.data(), st.integers(1, 24), st.integers(1, 24), st.integers(1, 3),
       st.sampled_from(["full", "lora"]))
def test_fuse_weighted_sum_is_exact_for_any_mix_of_kinds(data, out, inn, n, form):
    """weighted_sum of LoRA/LoHa/LoKr inputs = Σ wᵢΔWᵢ: as a full diff, or as a LoRA keeping every singular
    value (exact up to the fp32 Gram floor)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    modules = [data.draw(lycoris((out, inn), g)) for _ in range(n)]
    weights = [data.draw(st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 1e-2)) for _ in range(n)]
    T = sum(w * dense_lycoris(m) for w, m in zip(weights, modules))
    assume(float(T.norm()) > 1e-6 * sum(float(dense_lycoris(m).norm()) for m in modules))
    sets = [lora_set({NAME: m}, arch="other") for m in modules]
    result = fuse_models(sets, weights, strategy="weighted_sum", output_format=form, device="cpu",
                         rule=RankRule(energy=1.0, min_rank=1, max_rank=64))
    got = result.modules[NAME]
    fused = got.diff.to(F64) if form == "full" else dense_lycoris(got)
    assert rel(fused, T) < (1e-5 if form == "full" else 5e-4 * cancellation(sets, weights, T))


@PROFILE
@given(st.data(), st.integers(1, 6), st.booleans())
def test_flux_row_blocks_join_into_the_exact_fused_delta(data, hidden, single):
    """Any non-empty subset of a fused Flux weight's diffusers parts (q, k, v[, proj_mlp]), each of any rank,
    alpha and dtype, joins into one LoRA whose ΔW is each part's at its rows and zero elsewhere."""
    from merge_core.name_match import joined_rows

    target = "lora_unet_single_blocks_0_linear1" if single else "lora_unet_double_blocks_0_img_attn_qkv"
    heights = [hidden] * 3 + ([4 * hidden] if single else [])
    present = data.draw(st.sets(st.integers(0, len(heights) - 1), min_size=1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    blocks, want = {}, torch.zeros(sum(heights), hidden, dtype=F64)
    for i in sorted(present):
        r = data.draw(st.integers(1, 5))
        alpha = data.draw(st.one_of(st.none(), st.sampled_from([1.0, 0.5 * r, float(r), -2.0])))
        up, down = torch.randn(heights[i], r, generator=g).to(dtype), torch.randn(r, hidden, generator=g).to(dtype)
        blocks[i] = (f"part{i}", LoRA(up, down, alpha))
        start = sum(heights[:i])
        want[start:start + heights[i]] = (1.0 if alpha is None else alpha / r) * up.double() @ down.double()
    got = dense(joined_rows(target, blocks))
    assert torch.allclose(got, want, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-4)
