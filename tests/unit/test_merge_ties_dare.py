"""ties, dare and dare_ties on the dense deltas, checked against a TIES reference written here (topk trim, sign
election, disjoint mean), against DARE's defining property (every entry is a rescaled sum of a subset of the
inputs' entries) and, for dare_ties, the disjoint mean over the subsets dare kept with the same seed; with a
full-rank refit so the written file shows the method's dense result exactly."""
from __future__ import annotations

import math

import pytest
import torch

from merge_core.errors import MergeCoreError
from merge_core.lowrank import RankRule
from merge_core.merge import merge_loras
from merge_core.merge.ties_dare import floor_below, trim
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import NAMES, dense, lora_set, random_lora, rel, shape_of, target

N = NAMES[0]  # 640x640
FULL = RankRule(rank=640)


def sets(n_inputs: int = 3):
    return [lora_set({N: random_lora(shape_of(N), 8, 4.0, seed=10 * i)}) for i in range(n_inputs)]


def ties_reference(taus, density):
    trimmed = []
    for t in taus:
        k = math.ceil(density * t.numel())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().flatten().topk(k).indices] = True
        trimmed.append(torch.where(keep.reshape(t.shape), t, 0.0))
    elected = torch.sign(sum(trimmed))
    agree = [(torch.sign(t) == elected) & (t != 0) for t in trimmed]
    total = sum(torch.where(a, t, 0.0) for a, t in zip(agree, trimmed))
    count = sum(a.to(t.dtype) for a in agree)
    return total / count.clamp_min(1)


@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_ties_matches_the_reference(density):
    ss, w = sets(), [1.0, 0.5, -0.8]
    r = merge_loras(ss, "ties", weights=w, rule=FULL, solver="exact", density=density, device="cpu")
    ref = ties_reference([wi * dense(s.modules[N]) for wi, s in zip(w, ss)], density)
    assert rel(dense(r.modules[N]), ref) < 1e-5
    row = r.report.modules[0]
    assert row.rel_error == pytest.approx(rel(dense(r.modules[N]), target(ss, w, N)), rel=1e-4)
    assert row.note.startswith("fit ")


def test_dare_keeps_rescaled_subsets_and_is_seeded():
    ss, w, p = sets(2), [1.0, 1.0], 0.4
    r = merge_loras(ss, "dare", weights=w, rule=FULL, solver="exact", density=p, seed=5, device="cpu")
    t1, t2 = (dense(s.modules[N]) for s in ss)
    got = dense(r.modules[N])
    candidates = torch.stack([torch.zeros_like(t1), t1 / p, t2 / p, (t1 + t2) / p])
    dist = (candidates - got).abs().amin(0)
    assert float(dist.max()) < 1e-5 * float(got.abs().max())
    which = (candidates - got).abs().argmin(0)  # 0: both dropped, 1: only τ₁ kept, 2: only τ₂, 3: both
    kept1 = (which == 1) | (which == 3)
    assert float(kept1.double().mean()) == pytest.approx(p, abs=0.02)
    same = merge_loras(ss, "dare", weights=w, rule=FULL, solver="exact", density=p, seed=5, device="cpu")
    other = merge_loras(ss, "dare", weights=w, rule=FULL, solver="exact", density=p, seed=6, device="cpu")
    assert torch.equal(same.modules[N].up, r.modules[N].up)
    assert not torch.allclose(dense(other.modules[N]), got)


def test_dare_ties_elects_signs_over_dares_masks():
    ss, w, p = sets(2), [1.0, -0.7], 0.4
    kw = dict(weights=w, rule=FULL, solver="exact", density=p, seed=5, device="cpu")
    summed = dense(merge_loras(ss, "dare", **kw).modules[N])
    got = dense(merge_loras(ss, "dare_ties", **kw).modules[N])
    t1, t2 = (wi * dense(s.modules[N]) / p for wi, s in zip(w, ss))
    # the same seed draws the same masks: dare's sum tells what each input kept (0, τ₁, τ₂ or both)
    which = (torch.stack([torch.zeros_like(t1), t1, t2, t1 + t2]) - summed).abs().argmin(0)
    kept = [torch.where((which == 1) | (which == 3), t1, 0.0), torch.where((which == 2) | (which == 3), t2, 0.0)]
    elected = torch.sign(sum(kept))
    agree = [(torch.sign(k) == elected) & (k != 0) for k in kept]
    ref = sum(torch.where(a, k, 0.0) for a, k in zip(agree, kept)) / sum(a.to(t1.dtype) for a in agree).clamp_min(1)
    assert rel(got, ref) < 1e-5
    assert rel(got, summed) > 0.05  # where both kept entries disagree in sign, the mean differs from the sum


def test_dare_at_density_one_is_the_plain_sum():
    ss, w = sets(2), [0.5, -1.0]
    r = merge_loras(ss, "dare", weights=w, rule=RankRule(rank=16), density=1.0, device="cpu")
    assert rel(dense(r.modules[N]), target(ss, w, N)) < 1e-5  # rank 16 holds the whole sum


def test_default_refit_uses_the_dynamic_rule():
    r = merge_loras(sets(2), "ties", device="cpu")
    assert 4 <= r.modules[N].rank <= 32
    assert r.report.extra["parameters"]["rank_rule"] == {"energy": 0.99, "min_rank": 4, "max_rank": 32}


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range_is_refused(density):
    with pytest.raises(MergeCoreError, match="density must be in"):
        merge_loras(sets(2), "ties", density=density)


def test_trim_keeps_exactly_the_entries_at_or_above_the_threshold():
    t = 0.3
    below = float(torch.nextafter(torch.tensor(t), torch.tensor(0.0)))
    tau = torch.tensor([t, -t, below, -below, 0.0, 2 * t, -5 * t, 1e-30])
    got = trim(tau.clone(), floor_below(float(torch.tensor(t))))
    assert torch.equal(got, torch.tensor([t, -t, 0.0, 0.0, 0.0, 2 * t, -5 * t, 0.0]))
    assert torch.equal(trim(tau.clone(), floor_below(0.0)), tau)  # threshold 0: nothing trimmed
