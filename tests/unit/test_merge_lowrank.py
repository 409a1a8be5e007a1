"""rsvd, svd and weighted_avg against dense references: exact full-rank SVD, optimal truncation error, rsvd
within 1 % of optimal, the dynamic rank equal to the true energy rank, and reported errors equal to the real
ones (every check uses T = Σ wᵢ ΔWᵢ and torch.linalg.svd written here, in fp64)."""
from __future__ import annotations

import pytest
import torch

from merge_core.lowrank import RankRule
from merge_core.merge import merge_loras
from merge_core.merge.lowrank_methods import gram_core_limit
from merge_core.lowrank.gram_core import Stacked, gram_low_rank_batch
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import (NAMES, decaying_lora, dense, energy_rank, lora_set, optimal_error, random_lora, rel,
                                shape_of, target)

A_NAMES = NAMES[:3]


def decaying_pair(r1: int = 32, r2: int = 32, decays=(0.8, 0.85)):
    a = lora_set({n: decaying_lora(shape_of(n), r1, decays[0], seed=10 + i, alpha=r1 / 2)
                  for i, n in enumerate(A_NAMES)})
    b = lora_set({n: decaying_lora(shape_of(n), r2, decays[1], seed=50 + i) for i, n in enumerate(A_NAMES)})
    return a, b


def written(result, name):
    return dense(result.modules[name])


def test_svd_full_rank_is_exact():
    a = lora_set({n: random_lora(shape_of(n), 8, 4.0, seed=i) for i, n in enumerate(A_NAMES)})
    b = lora_set({n: random_lora(shape_of(n), 4, None, seed=20 + i) for i, n in enumerate(A_NAMES)})
    r = merge_loras([a, b], "svd", weights=[0.7, -0.4], rule=RankRule(rank=12), device="cpu")
    for n in A_NAMES:
        T = target([a, b], [0.7, -0.4], n)
        assert rel(written(r, n), T) < 2e-6
        m = r.modules[n]
        assert m.rank == 12 and m.alpha == 12.0


@pytest.mark.parametrize("method,weights", [("svd", [1.0, 1.0]), ("weighted_avg", [0.5, 0.5])])
def test_truncated_svd_has_the_optimal_error(method, weights):
    a, b = decaying_pair()
    r = merge_loras([a, b], method, device="cpu")  # default: fixed rank = largest input rank (32)
    assert r.report.extra["parameters"]["weights"] == weights
    rows = {m.name: m for m in r.report.modules}
    for n in A_NAMES:
        T = target([a, b], weights, n)
        opt = optimal_error(T, 32)
        got = rel(written(r, n), T)
        assert r.modules[n].rank == 32
        assert got == pytest.approx(opt, rel=1e-4, abs=1e-6)
        assert rows[n].rel_error == pytest.approx(got, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("solver", ["rsvd", "exact", "dense"])
def test_rsvd_dynamic_rank_is_the_true_energy_rank(solver):
    a, b = decaying_pair()
    r = merge_loras([a, b], "rsvd", solver=solver, device="cpu")
    rows = {m.name: m for m in r.report.modules}
    for n in A_NAMES:
        T = target([a, b], [0.5, 0.5], n)
        k = energy_rank(T)
        assert r.modules[n].rank == k
        got = rel(written(r, n), T)
        assert got <= optimal_error(T, k) * 1.01 + 1e-6
        assert rows[n].rel_error == pytest.approx(got, rel=1e-3, abs=1e-6)
        assert rows[n].energy_kept == pytest.approx(1 - got ** 2, abs=1e-5)
        assert rows[n].energy_kept >= 0.99 - 1e-6


@pytest.mark.parametrize("rank", [10, 24])
def test_randomized_path_within_one_percent_of_optimal(rank):
    """Five rank-32 inputs, stacked rank 160: rank 10 is beyond the CPU's Gram-core limit 8(k+p) = 144, so rsvd
    sketches (seeded, power iterations); rank 24 (limit 256) is solved exactly by the Gram core."""
    assert (160 > gram_core_limit(RankRule(rank=rank))) == (rank == 10)
    sets = [lora_set({n: decaying_lora(shape_of(n), 32, 0.8 + 0.02 * j, seed=100 * j + i)
                      for i, n in enumerate(NAMES[:2])}) for j in range(5)]
    w = [0.2, 0.3, -0.1, 0.25, 0.15]
    r = merge_loras(sets, "rsvd", weights=w, rule=RankRule(rank=rank), seed=3, device="cpu")
    again = merge_loras(sets, "rsvd", weights=w, rule=RankRule(rank=rank), seed=3, device="cpu")
    for n in NAMES[:2]:
        T = target(sets, w, n)
        optimal = optimal_error(T, rank)
        assert rel(written(r, n), T) <= optimal * (1.01 if rank == 10 else 1 + 1e-4)
        assert torch.equal(r.modules[n].up, again.modules[n].up)  # seeded


def test_rsvd_energy_and_clamps():
    a, b = decaying_pair(decays=(0.5, 0.5))  # energy reached fast: min rank applies
    r = merge_loras([a, b], "rsvd", rule=RankRule(energy=0.9, min_rank=6, max_rank=10), device="cpu")
    for n in A_NAMES:
        assert r.modules[n].rank == min(max(energy_rank(target([a, b], [0.5, 0.5], n), 0.9, 6, 10), 6), 10)


def test_gram_core_duplicates_and_zero_module():
    """Identical inputs (singular Gram) give the rank of one input; an all-zero module gives rank 0."""
    m = decaying_lora(shape_of(NAMES[0]), 16, 0.9, seed=1)
    zero = random_lora(shape_of(NAMES[1]), 4, 4.0, seed=2)
    zero.up.zero_()
    a = lora_set({NAMES[0]: m, NAMES[1]: zero})
    r = merge_loras([a, a], "rsvd", rule=RankRule(energy=1.0, min_rank=1, max_rank=64), device="cpu")
    assert r.modules[NAMES[0]].rank == 16
    assert rel(written(r, NAMES[0]), dense(m)) < 1e-5
    assert NAMES[1] not in r.modules
    assert {x.name: x.rank for x in r.report.modules}[NAMES[1]] == 0
    # truncated below the shared rank: the root of the singular Gram still gives the optimal factors and error
    r8 = merge_loras([a, a], "rsvd", rule=RankRule(rank=8), device="cpu")
    best = optimal_error(dense(m), 8)
    assert rel(written(r8, NAMES[0]), dense(m)) == pytest.approx(best, rel=1e-4)
    assert {x.name: x.rel_error for x in r8.report.modules}[NAMES[0]] == pytest.approx(best, rel=1e-4)


def test_gram_core_batch_matches_dense_svd():
    gen = torch.Generator().manual_seed(0)
    U, V = torch.randn(3, 200, 12, generator=gen), torch.randn(3, 12, 150, generator=gen)
    c = torch.rand(3, 12, generator=gen, dtype=torch.float64) + 0.5
    blocks = Stacked([[U[b, :, :7], U[b, :, 7:]] for b in range(3)], [[V[b, :7], V[b, 7:]] for b in range(3)], c)
    for ranks in ([5, 5, 5], [3, 7, 5]):  # one rule for the batch, or one per module (a size budget's ranks)
        for b, lr in enumerate(gram_low_rank_batch(blocks, [RankRule(rank=k) for k in ranks])):
            T = U[b].double() @ (c[b, :, None] * V[b].double())
            assert lr.rank == ranks[b]
            assert rel(lr.up.double() @ lr.down.double(), T) == pytest.approx(optimal_error(T, ranks[b]), rel=1e-4)
            assert lr.quality.rel_error == pytest.approx(optimal_error(T, ranks[b]), rel=1e-4)
