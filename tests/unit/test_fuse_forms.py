"""Output forms against dense references written here: full exact, lora exact at full rank and SVD-optimal
when truncated, lokr = the dense Van Loan–Pitsianis solution, auto's choice, fallbacks, --verify on files."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from merge_core.adapters import LoHa, LoKr
from merge_core.fuse import fuse_models, verify_written
from merge_core.keys.profiles import Naming
from merge_core.lora_file import LoraSet, load_lora
from merge_core.lowrank import RankRule

A, B, C, E = 3, 4, 10, 8  # w1 a×b, w2 c×e: ΔW is 30×32


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lokr(seed, rank=3, alpha=2.0, w1=None):
    return LoKr(w1=rnd(A, B, seed=seed) if w1 is None else w1, w2a=rnd(C, rank, seed=seed + 1),
                w2b=rnd(rank, E, seed=seed + 2), alpha=alpha)


def lokr_full(seed, w1=None):
    return LoKr(w1=rnd(A, B, seed=seed) if w1 is None else w1, w2=rnd(C, E, seed=seed + 1))


def loha(seed, rank=3):
    return LoHa(rnd(A * C, rank, seed=seed), rnd(rank, B * E, seed=seed + 1), rnd(A * C, rank, seed=seed + 2),
                rnd(rank, B * E, seed=seed + 3), alpha=1.0)


def dense(m) -> torch.Tensor:
    if isinstance(m, LoKr):
        if m.w2 is not None:
            return torch.kron(m.w1, m.w2).double()
        return (m.alpha / m.w2b.shape[0]) * torch.kron(m.w1, m.w2a @ m.w2b).double()
    return ((m.alpha / m.w1b.shape[0]) * (m.w1a @ m.w1b) * (m.w2a @ m.w2b)).double()


def sets_of(*modules):
    return [LoraSet({"mod": m}, Naming("kohya", "other", {"mod": "mod"})) for m in modules]


def fuse(modules, weights, form, rule=None, strategy="weighted_sum"):
    return fuse_models(sets_of(*modules), weights, strategy, 1.0, form, rule, device="cpu")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def nearest_kron_dense(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Van Loan–Pitsianis on the dense matrix: R[(i,j),(p,q)] = T[i·c+p, j·e+q], top singular pair."""
    R = T.reshape(A, C, B, E).permute(0, 2, 1, 3).reshape(A * B, C * E)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    X = (U[:, 0] * S[0].sqrt()).reshape(A, B)
    Y = (Vh[0] * S[0].sqrt()).reshape(C, E)
    return X, Y, float(S[0] ** 2 / (S ** 2).sum())


def test_full_is_exact_to_round_off():
    mods, w = [lokr(1), loha(5), lokr(9)], [0.3, 1.1, -0.6]
    got = fuse(mods, w, "full").modules["mod"].diff
    assert rel(got, sum(x * dense(m) for x, m in zip(w, mods))) < 1e-6


@pytest.mark.parametrize("mods", [lambda: [lokr(1), lokr(9, rank=2)], lambda: [loha(1), loha(5, rank=2)],
                                  lambda: [lokr(1), loha(5)],
                                  lambda: [loha(1, rank=6), loha(5, rank=6)]])  # stacked rank 72 > 30 rows
def test_lora_at_full_rank_is_exact(mods):
    mods = mods()
    res = fuse(mods, [0.7, 0.4], "lora", RankRule(energy=1.0, min_rank=1, max_rank=10_000))
    truth = 0.7 * dense(mods[0]) + 0.4 * dense(mods[1])
    assert rel(res.modules["mod"].delta(), truth) < 1e-5
    assert res.report.modules[0].rel_error < 1e-5
    assert res.modules["mod"].rank == int(torch.linalg.matrix_rank(truth, rtol=1e-5))


@pytest.mark.parametrize("k", [2, 7])
def test_lora_truncation_is_the_dense_svd_optimum(k):
    mods = [loha(1), loha(5)]
    res = fuse(mods, [0.5, 0.5], "lora", RankRule(rank=k))
    truth = 0.5 * dense(mods[0]) + 0.5 * dense(mods[1])
    S = torch.linalg.svdvals(truth)
    best = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())
    assert rel(res.modules["mod"].delta(), truth) == pytest.approx(best, rel=1e-4)
    assert res.report.modules[0].rel_error == pytest.approx(best, rel=1e-4)


def test_lokr_is_the_dense_nearest_kronecker_product():
    mods, w = [lokr_full(1), lokr_full(7), lokr_full(13)], [0.5, 0.8, -0.3]
    truth = sum(x * dense(m) for x, m in zip(w, mods))
    X, Y, energy = nearest_kron_dense(truth)
    res = fuse(mods, w, "lokr")
    out = res.modules["mod"]
    assert out.kind == "lokr" and out.w2 is not None and out.alpha is None  # both full: scale 1 by rule
    assert rel(torch.kron(out.w1, out.w2), torch.kron(X, Y)) < 1e-5
    row = res.report.modules[0]
    assert row.energy_kept == pytest.approx(energy, rel=1e-5)
    assert row.rel_error == pytest.approx(float((truth - torch.kron(X, Y)).norm() / truth.norm()), rel=1e-4)


def test_lokr_truncates_w2_to_the_inputs_rank_optimally():
    mods, w = [lokr(1, rank=3), lokr(7, rank=2)], [0.6, 0.9]
    truth = sum(x * dense(m) for x, m in zip(w, mods))
    X, Y, _ = nearest_kron_dense(truth)
    U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    Y3 = (U[:, :3] * S[:3]) @ Vh[:3]  # given X, the best rank-3 w2 is Y's SVD truncation
    res = fuse(mods, w, "lokr")
    out = res.modules["mod"]
    assert out.w2a.shape == (C, 3) and out.w2b.shape == (3, E) and out.alpha == 3.0  # scale α/dim = 1
    assert rel(out.delta(), torch.kron(X, Y3)) < 1e-5
    err = float((truth - torch.kron(X, Y3)).norm() / truth.norm())
    assert res.report.modules[0].rel_error == pytest.approx(err, rel=1e-4)


@pytest.mark.parametrize("factored", [False, True])
def test_lokr_is_exact_when_inputs_share_w1_up_to_scale(factored):
    w1 = rnd(A, B, seed=99)
    if factored:  # the w2 share a column space too, so the fused w2 has rank 3 and its truncation is exact
        P = rnd(C, 3, seed=2)
        mods = [LoKr(w1=w1, w2a=P, w2b=rnd(3, E, seed=3), alpha=2.0),
                LoKr(w1=-2.5 * w1, w2a=P @ rnd(3, 3, seed=4), w2b=rnd(3, E, seed=5), alpha=3.0)]
    else:
        mods = [lokr_full(1, w1=w1), lokr_full(7, w1=0.4 * w1), lokr_full(13, w1=-1.5 * w1)]
    w = [0.7, 0.2, 0.5][: len(mods)]
    truth = sum(x * dense(m) for x, m in zip(w, mods))
    for form in ("lokr", "auto"):
        res = fuse(mods, w, form)
        assert res.modules["mod"].kind == "lokr"
        assert rel(res.modules["mod"].delta(), truth) < 1e-5
        assert res.report.modules[0].rel_error < 1e-5


def test_auto_falls_back_to_lora_at_the_energy_when_kron_is_lossy():
    mods, w = [lokr(1), lokr(7)], [0.5, 0.5]
    res = fuse(mods, w, "auto", RankRule(energy=0.999, min_rank=1, max_rank=64))
    row = res.report.modules[0]
    assert row.kind == "lora" and "< 99.9%: lora" in row.note
    truth = 0.5 * dense(mods[0]) + 0.5 * dense(mods[1])
    S2 = torch.linalg.svdvals(truth).square()
    need = int((torch.cumsum(S2, 0) / S2.sum() >= 0.999).nonzero()[0]) + 1
    assert row.rank == need and row.energy_kept >= 0.999


def test_lokr_shape_mismatch_falls_back_with_note_and_warning(caplog):
    other = lokr_full(3)  # same factor shapes as the first: fine
    odd = LoKr(w1=rnd(A * 2, B * 2, seed=5), w2=rnd(C // 2, E // 2, seed=6))  # same ΔW shape, other factors
    with caplog.at_level(logging.WARNING):
        res = fuse([lokr_full(1), other, odd], [0.3, 0.3, 0.4], "lokr", RankRule(energy=1.0, min_rank=1, max_rank=99))
    row = res.report.modules[0]
    assert row.kind == "lora" and "lokr fallback to lora: factor shapes differ" in row.note
    assert "input 3 w1 6x8 w2 5x4" in row.note
    assert any("could not be written as lokr" in r.getMessage() for r in caplog.records)
    truth = 0.3 * dense(lokr_full(1)) + 0.3 * dense(other) + 0.4 * dense(odd)
    assert rel(res.modules["mod"].delta(), truth) < 1e-5
    assert "input 2 is loha" in fuse([lokr(1), loha(2)], None, "lokr").report.modules[0].note


@pytest.mark.parametrize("suffix,dtype,tol", [(".safetensors", "fp32", 1e-5), (".pt", "fp16", 2e-3)])
@pytest.mark.parametrize("form", ["lokr", "lora", "full"])
def test_written_file_verifies(tmp_path, form, suffix, dtype, tol):
    sets = sets_of(lokr(1), lokr(7, rank=2))
    res = fuse_models(sets, [0.6, 0.4], "smart_fusion", output_format=form,
                      rule=RankRule(energy=1.0, min_rank=1, max_rank=99), device="cpu")
    path = res.save(tmp_path / f"out{suffix}", dtype=dtype)
    errors = verify_written(path, sets, res.report, "cpu")
    row = res.report.modules[0]
    assert errors["mod"] == pytest.approx(row.rel_error, abs=tol)
    back = load_lora(path).modules["mod"]
    assert back.kind == row.kind
    truth = sum(c * dense(s.modules["mod"]) for c, s in zip(res.report.extra["coefficients"]["mod"], sets))
    assert rel(back.delta(), truth) == pytest.approx(errors["mod"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("form", ["lokr", "lora", "full"])
def test_conv_lokr_keeps_its_4d_layout(form):
    """Conv LoKr with a full 4-D w2: ComfyUI's ΔW = kron(w1[:, :, None, None], w2), shape (a·c, b·d, kh, kw)."""
    mods = [LoKr(w1=rnd(2, 2, seed=s), w2=rnd(4, 3, 3, 3, seed=s + 1)) for s in (1, 5)]
    truth = sum(x * torch.kron(m.w1[:, :, None, None], m.w2) for x, m in zip([0.5, 0.5], mods))
    shared = [LoKr(w1=rnd(2, 2, seed=1) * f, w2=rnd(4, 3, 3, 3, seed=s)) for f, s in ((1.0, 2), (-2.0, 6))]
    exact = sum(x * torch.kron(m.w1[:, :, None, None], m.w2) for x, m in zip([0.5, 0.5], shared))
    for inputs, target in ((mods, truth), (shared, exact)):
        out = fuse(inputs, [0.5, 0.5], form, RankRule(energy=1.0, min_rank=1, max_rank=99)).modules["mod"]
        assert out.weight_shape == (8, 6, 3, 3)
        if form == "lokr":
            assert out.w2.shape == (4, 3, 3, 3)
        if form != "lokr" or inputs is shared:
            assert rel(out.delta(), target) < 1e-5


@pytest.mark.parametrize("form", ["auto", "lokr", "lora", "full"])
def test_streamed_file_equals_the_held_result_saved(tmp_path, form):
    """fuse_to_file (what the CLI writes .safetensors with: module by module, on worker threads) writes the
    tensors and metadata fuse_models + save writes; a module only some inputs have, and a bias, included."""
    from safetensors import safe_open

    from merge_core.fuse.engine import plan_fuse
    from merge_core.fuse.to_file import fuse_to_file

    naming = Naming("kohya", "other", {"mod": "mod", "other": "other"})
    with_bias = lokr(5)
    with_bias.diff_b = rnd(A * C, seed=9)
    sets = [LoraSet({"mod": lokr(1), "other": loha(3)}, naming), LoraSet({"mod": with_bias}, naming)]
    rule = RankRule(energy=0.99, min_rank=1, max_rank=6)
    held = fuse_models(sets, [0.7, 0.5], "smart_fusion", 1.0, form, rule, device="cpu")
    held.recipe["parameters"]["dtype"] = "fp16"
    held.save(tmp_path / "held.safetensors", dtype="fp16")
    plan = plan_fuse(sets, [0.7, 0.5], "smart_fusion", 1.0, form, rule)
    report = fuse_to_file(plan, tmp_path / "streamed.safetensors", "fp16", device="cpu")
    assert report.modules == held.report.modules
    files = [safe_open(str(tmp_path / f"{n}.safetensors"), "pt") for n in ("held", "streamed")]
    assert sorted(files[0].keys()) == sorted(files[1].keys()) and files[0].keys()
    for key in files[0].keys():
        assert torch.equal(files[0].get_tensor(key), files[1].get_tensor(key)), key
    meta = [f.metadata() for f in files]
    for m in meta:
        m["lora_rsvd_merge.recipe"] = json.loads(m["lora_rsvd_merge.recipe"])
        m["lora_rsvd_merge.recipe"].pop("created")
        m.pop("ss_output_name", None), m.pop("modelspec.title", None), m.pop("modelspec.date", None)
    assert meta[0] == meta[1]


def test_inputs_that_share_no_module_are_fused_with_the_merges_warning(caplog):
    """As merge warns: no module is in two inputs, so nothing is fused with anything; no warning once one is."""
    def one(name, module):
        return LoraSet({name: module}, Naming("kohya", "other", {name: name}))

    a, b = one("lora_unet_a", lokr(1)), one("lora_unet_b", lokr(4))
    with caplog.at_level(logging.WARNING):
        res = fuse_models([a, b], strategy="weighted_sum", output_format="full")
    assert set(res.modules) == {"lora_unet_a", "lora_unet_b"}
    assert [r.getMessage() for r in caplog.records] == [
        "no module is in more than one input: the result holds each input's modules side by side, merged with "
        "nothing (e.g. 'lora_unet_a' in input 1, 'lora_unet_b' in input 2)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fuse_models([a, b, one("lora_unet_a", lokr(7))], strategy="weighted_sum", output_format="full")
    assert caplog.records == []
