"""The low-rank engine against dense references: exact SVD, randomized SVD, rank rules, exact quality."""
import math

import pytest
import torch

from merge_core.errors import MergeCoreError
from merge_core.lowrank import Dense, Factored, RankRule, choose_rank, choose_ranks, frob2, inner, low_rank, measure, weighted_sum
from merge_core.lowrank.exact_svd import factored_svd
from merge_core.lowrank.rsvd import randomized_svd
from synth import randn


def decaying(out, n, r, decay=0.8, seed=0):
    qu, _ = torch.linalg.qr(randn(out, r, seed=seed))
    qv, _ = torch.linalg.qr(randn(n, r, seed=seed + 1))
    s = decay ** torch.arange(r, dtype=torch.float32)
    return Factored(qu * s, qv.T), s


def optimal_error(dense, k, s=None):
    """Eckart–Young: the best rank-k error, from the known spectrum or a dense SVD."""
    s = torch.linalg.svdvals(dense.double()) if s is None else s.double()
    return float(torch.sqrt((s[k:] ** 2).sum() / (s ** 2).sum()))


def test_weighted_sum_stacks_factors_exactly():
    a = Factored(randn(30, 4, seed=1), randn(4, 20, seed=2))
    b = Factored(randn(30, 8, seed=3), randn(8, 20, seed=4))
    t = weighted_sum([(0.7, a), (-1.3, b)])
    assert isinstance(t, Factored) and t.inner_rank == 12
    assert torch.allclose(t.dense(), 0.7 * a.dense() - 1.3 * b.dense(), atol=1e-5)
    d = weighted_sum([(2.0, a), (1.0, Dense(randn(30, 20, seed=5)))])
    assert isinstance(d, Dense)
    assert torch.allclose(d.dense(), 2 * a.dense() + randn(30, 20, seed=5), atol=1e-5)


def test_exact_norms_and_inner_products_from_factors():
    a = Factored(randn(50, 6, seed=1), randn(6, 40, seed=2))
    b = Factored(randn(50, 3, seed=3), randn(3, 40, seed=4))
    da, db = a.dense().double(), b.dense().double()
    assert frob2(a) == pytest.approx(float((da ** 2).sum()), rel=1e-6)
    assert inner(a, b) == pytest.approx(float((da * db).sum()), rel=1e-6)
    assert inner(a, Dense(b.dense())) == pytest.approx(float((da * db).sum()), rel=1e-5)


def test_dense_sums_span_several_fp64_chunks_exactly(monkeypatch):
    """Dense norms and inner products go through fp64 a chunk of rows at a time: same sums as a whole fp64 copy."""
    import merge_core.lowrank.operators as ops

    monkeypatch.setattr(ops, "F64_CHUNK", 7 * 40 + 3)  # 7 rows a chunk, a ragged last chunk
    W, W2 = randn(50, 40, seed=5), randn(50, 40, seed=6)
    f = Factored(randn(50, 4, seed=7), randn(4, 40, seed=8))
    dW, dW2, df = W.double(), W2.double(), f.U.double() @ f.V.double()
    assert frob2(Dense(W)) == pytest.approx(float((dW ** 2).sum()), rel=1e-12)
    assert inner(Dense(W), Dense(W2)) == pytest.approx(float((dW * dW2).sum()), rel=1e-12)
    assert inner(Dense(W), f) == pytest.approx(float((dW * df).sum()), rel=1e-9)
    assert inner(f, Dense(W)) == inner(Dense(W), f)


@pytest.mark.parametrize("shape,r", [((640, 640), 16), ((320, 1280), 64), ((200, 90), 120)])
def test_exact_factored_svd_matches_dense_svd(shape, r):
    op = Factored(randn(shape[0], r, seed=1), randn(r, shape[1], seed=2))
    s_exact = factored_svd(op).S
    s_dense = torch.linalg.svdvals(op.dense())
    k = min(r, *shape)
    rel = (s_exact[:k] - s_dense[:k]).abs() / s_dense[:k]
    assert float(rel.max()) < 1e-5
    svd = factored_svd(op)  # and it reconstructs T
    assert torch.allclose((svd.U * svd.S) @ svd.Vh, op.dense(), atol=1e-4 * float(s_dense[0]))


@pytest.mark.parametrize("shape", [(640, 640), (1280, 640), (640, 2048)])
def test_rsvd_within_one_percent_of_optimal_on_decaying_spectra(shape):
    op, s = decaying(*shape, r=96, decay=0.93, seed=3)
    k = 24
    res = low_rank(op, RankRule(rank=k), "rsvd", seed=0)
    best = optimal_error(None, k, s)
    assert res.rank == k
    assert res.quality.rel_error <= 1.01 * best
    dense_res = low_rank(Dense(op.dense()), RankRule(rank=k), "rsvd", seed=0)  # matrix-free on dense too
    assert dense_res.quality.rel_error <= 1.01 * best


def test_rsvd_is_seeded():
    op, _ = decaying(300, 200, 40, seed=1)
    a, b = randomized_svd(op, 10, seed=5), randomized_svd(op, 10, seed=5)
    assert torch.equal(a.S, b.S) and torch.equal(a.U, b.U)


def test_truncated_exact_svd_has_the_optimal_error_and_exact_quality():
    op = Factored(randn(120, 30, seed=1), randn(30, 90, seed=2))
    res = low_rank(op, RankRule(rank=10), "exact")
    dense_err = torch.linalg.norm(op.dense() - res.up @ res.down) / torch.linalg.norm(op.dense())
    assert res.quality.rel_error == pytest.approx(float(dense_err), rel=1e-4)
    assert res.quality.rel_error == pytest.approx(optimal_error(op.dense(), 10), rel=1e-4)
    assert res.quality.energy_kept == pytest.approx(1 - float(dense_err) ** 2, rel=1e-5)


def test_singular_values_split_evenly_between_factors():
    op = Factored(randn(40, 5, seed=1), randn(5, 30, seed=2))
    res = low_rank(op, RankRule(rank=5), "exact")
    # up = U√S, down = √S Vᵀ: column norms of up equal row norms of down
    assert torch.allclose(res.up.norm(dim=0), res.down.norm(dim=1), rtol=1e-4)


def test_dynamic_rank_equals_true_energy_rank():
    op, s = decaying(500, 400, 60, decay=0.85, seed=2)
    for energy in (0.5, 0.9, 0.99, 0.999):
        share = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        true_k = int((share < energy).sum()) + 1
        for solver in ("exact", "rsvd", "dense"):
            res = low_rank(op, RankRule(energy=energy, min_rank=1, max_rank=64), solver)
            assert res.rank == true_k, (energy, solver)
            assert res.quality.energy_kept >= energy - 1e-6


def test_energy_one_keeps_every_nonzero_singular_value():
    op = Factored(randn(50, 7, seed=1), randn(7, 40, seed=2))
    res = low_rank(op, RankRule(energy=1.0, min_rank=1, max_rank=64), "exact")
    assert res.rank == 7 and res.quality.rel_error < 1e-5


@pytest.mark.parametrize("shape, r", [((640, 2048), 8), ((10240, 1280), 12)])
def test_a_fixed_rank_above_the_true_rank_keeps_no_round_off_direction_with_any_solver(shape, r):
    """(the dense fp32 SVD's round-off σ reach ~1e-6·σ₁ on SDXL shapes, above the null tolerance)"""
    op = Factored(randn(shape[0], r, seed=1), randn(r, shape[1], seed=2))
    for solver in ("dense", "exact", "rsvd"):
        res = low_rank(op, RankRule(rank=32), solver)
        assert res.rank == r and res.quality.rel_error < 1e-5, solver


def test_rank_above_matrix_size_is_clamped():
    op = Factored(randn(6, 10, seed=1), randn(10, 40, seed=2))
    assert low_rank(op, RankRule(rank=32), "exact").rank == 6
    assert low_rank(op, RankRule(rank=32), "rsvd").rank == 6


def test_all_zero_module_gets_rank_zero():
    op = Factored(torch.zeros(20, 4), torch.zeros(4, 10))
    res = low_rank(op, RankRule(), "exact")
    assert res.rank == 0 and res.up is None
    assert res.quality.rel_error == 0.0 and res.quality.energy_kept == 1.0


def test_fewer_singular_values_than_min_rank_keeps_what_exists():
    op = Factored(randn(64, 2, seed=1), randn(2, 48, seed=2))  # exact rank 2 < min_rank 4
    for solver in ("exact", "rsvd", "dense"):
        res = low_rank(op, RankRule(min_rank=4, max_rank=32), solver)
        assert res.rank == 2 and res.quality.rel_error < 1e-5


def test_min_rank_is_a_floor_when_singular_values_exist():
    op, _ = decaying(100, 80, 30, decay=0.3, seed=1)  # 99 % energy in ~3 values
    assert low_rank(op, RankRule(energy=0.99, min_rank=8, max_rank=16), "exact").rank == 8


def test_choose_rank_without_reaching_energy_uses_max_rank():
    s = torch.ones(50)
    assert choose_rank(s, 50.0, RankRule(energy=0.99, min_rank=4, max_rank=32), (100, 100)) == 32


def test_choose_ranks_decides_each_row_of_a_batch_on_its_own():
    decaying = 0.5 ** torch.arange(40, dtype=torch.float64)  # Σσ² reaches 99 % of its total at k = 4
    rows = torch.stack([decaying, torch.zeros(40), torch.cat([torch.ones(2), torch.zeros(38)]), torch.ones(40)])
    totals = [float((r ** 2).sum()) for r in rows]
    assert choose_ranks(rows, totals, RankRule(energy=0.99, min_rank=2, max_rank=32), (64, 64)) == [4, 0, 2, 32]
    # min_rank above the non-zero count keeps only what exists; max_rank caps the flat spectrum
    assert choose_ranks(rows, totals, RankRule(energy=0.99, min_rank=6, max_rank=8), (64, 64)) == [6, 0, 2, 8]
    # a fixed rank is clamped to min(out, in) and to the non-zero count (0.5^i drops below 1e-6·σ₁ after 20);
    # energy 1.0 keeps every non-zero value
    assert choose_ranks(rows, totals, RankRule(rank=50), (30, 64)) == [20, 0, 2, 30]
    assert choose_ranks(rows, totals, RankRule(energy=1.0, min_rank=1, max_rank=64), (64, 64)) == [20, 0, 2, 40]
    assert [choose_rank(r, t, RankRule(), (64, 64)) for r, t in zip(rows, totals)] == \
        choose_ranks(rows, totals, RankRule(), (64, 64))


def test_rank_rule_validation():
    for bad in (dict(rank=0), dict(energy=0.0), dict(energy=1.5), dict(min_rank=8, max_rank=4)):
        with pytest.raises(MergeCoreError):
            RankRule(**bad)


def test_measure_matches_dense_error():
    t = Factored(randn(60, 8, seed=1), randn(8, 50, seed=2))
    a = Factored(randn(60, 3, seed=3), randn(3, 50, seed=4))
    q = measure(t, a)
    dense = float(torch.linalg.norm(t.dense() - a.dense()) / torch.linalg.norm(t.dense()))
    assert q.rel_error == pytest.approx(dense, rel=1e-5)
    assert measure(t, None).rel_error == 1.0
    assert math.isclose(measure(Dense(torch.zeros(3, 3)), None).energy_kept, 1.0)
