"""Fusion strategies against dense references written here: every strategy on LoKr pairs, LoHa pairs, a
LoKr+LoHa+LoRA mix and N = 4, via the exact `full` form; factor summing (the original tool) shown wrong."""
from __future__ import annotations

import pytest
import torch

from merge_core.adapters import LoHa, LoKr, LoRA
from merge_core.errors import MergeCoreError
from merge_core.fuse import STRATEGIES, fuse_models
from merge_core.keys.profiles import Naming
from merge_core.lora_file import LoraSet

OUT, IN = 24, 20  # w1 4×4 (LoKr: w2 6×5)


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lokr(seed, rank=2, alpha=3.0):
    return LoKr(w1=rnd(4, 4, seed=seed), w2a=rnd(6, rank, seed=seed + 1), w2b=rnd(rank, 5, seed=seed + 2), alpha=alpha)


def loha(seed, rank=3, alpha=2.0):
    return LoHa(rnd(OUT, rank, seed=seed), rnd(rank, IN, seed=seed + 1), rnd(OUT, rank, seed=seed + 2),
                rnd(rank, IN, seed=seed + 3), alpha=alpha)


def lora(seed, rank=4, alpha=None):
    return LoRA(rnd(OUT, rank, seed=seed), rnd(rank, IN, seed=seed + 1), alpha)


# dense ΔW of each kind, straight from the formulas ComfyUI applies
def dense(m) -> torch.Tensor:
    if isinstance(m, LoKr):
        return (m.alpha / m.w2b.shape[0]) * torch.kron(m.w1, m.w2a @ m.w2b)
    if isinstance(m, LoHa):
        return (m.alpha / m.w1b.shape[0]) * (m.w1a @ m.w1b) * (m.w2a @ m.w2b)
    scale = 1.0 if m.alpha is None else m.alpha / m.down.shape[0]
    return scale * m.up @ m.down


def as_set(m, name="mod") -> LoraSet:
    return LoraSet({name: m}, Naming("kohya", "other", {name: name}))


COMBOS = {
    "lokr_pair": (lambda: [lokr(1), lokr(10, rank=3, alpha=1.0)], [0.7, 0.5]),
    "loha_pair": (lambda: [loha(1), loha(10, rank=2, alpha=5.0)], [0.6, -0.4]),
    "lokr_loha_lora": (lambda: [lokr(1), loha(10), lora(20)], [0.5, 0.3, 0.9]),
    "four": (lambda: [lokr(1), lokr(5, rank=1), loha(10), lora(20, alpha=2.0)], [1.0, 0.25, 0.5, 0.75]),
}


def reference(strategy: str, deltas: list[torch.Tensor], w: list[float], tau: float) -> torch.Tensor:
    """The strategy's definition, on dense deltas."""
    k = len(deltas)
    if strategy == "weighted_sum":
        c = w
    elif strategy == "weighted_average":
        c = [x / sum(w) for x in w]
    elif strategy == "layer_adaptive":
        inv = [1.0 / float(d.double().var(unbiased=False)) for d in deltas]
        c = [x * k * a / sum(inv) for x, a in zip(w, inv)]
    elif strategy == "smart_fusion":
        norms = [float(d.double().norm()) for d in deltas]
        c = [x * k * n / sum(norms) for x, n in zip(w, norms)]
    else:
        s = sum(x * d for x, d in zip(w, deltas))
        gamma = min(1.0, tau * max(float(d.abs().max()) for d in deltas) / float(s.abs().max()))
        c = [gamma * x for x in w]
    return sum(ci * d.double() for ci, d in zip(c, deltas))


def fused_dense(modules, weights, strategy, tau=0.6, form="full") -> torch.Tensor:
    res = fuse_models([as_set(m) for m in modules], weights, strategy, tau, form, device="cpu")
    return res.modules["mod"].delta().double()


@pytest.mark.parametrize("combo", sorted(COMBOS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_matches_dense_definition(strategy, combo):
    make, w = COMBOS[combo]
    modules = make()
    want = reference(strategy, [dense(m) for m in modules], w, 0.6)
    got = fused_dense(modules, w, strategy)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_weighted_average_is_a_real_average():
    modules, w = COMBOS["lokr_pair"][0](), [0.7, 0.5]
    total = fused_dense(modules, w, "weighted_sum")
    avg = fused_dense(modules, w, "weighted_average")
    torch.testing.assert_close(avg, total / 1.2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [0.2, 0.5, 3.0])
def test_min_max_norm_bound_holds_and_only_scales(tau):
    modules, w = [lokr(1), loha(10), lora(20)], [2.0, 1.5, 1.0]
    deltas = [dense(m) for m in modules]
    got = fused_dense(modules, w, "min_max_norm", tau)
    limit = tau * max(float(d.abs().max()) for d in deltas)
    assert float(got.abs().max()) <= limit * (1 + 1e-5)
    plain = sum(x * d.double() for x, d in zip(w, deltas))
    ratio = float((got * plain).sum() / (plain * plain).sum())
    torch.testing.assert_close(got, ratio * plain, rtol=1e-5, atol=1e-7)  # a pure scaling, never a shift
    assert ratio <= 1.0 + 1e-6


def test_missing_module_counts_as_zero_delta():
    a = LoraSet({"x": lokr(1), "y": loha(3)}, Naming("kohya", "other", {}))
    b = LoraSet({"x": lokr(7)}, Naming("kohya", "other", {}))
    res = fuse_models([a, b], [0.4, 0.8], "weighted_average", output_format="full", device="cpu")
    torch.testing.assert_close(res.modules["y"].delta(), dense(a.modules["y"]) * 0.4 / 1.2, rtol=1e-5, atol=1e-7)
    assert "in 1 of 2 inputs" in next(m.note for m in res.report.modules if m.name == "y")
    assert res.report.extra["coefficients"]["y"] == [pytest.approx(0.4 / 1.2), 0.0]


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_factor_summing_is_wrong_and_ours_is_right(kind):
    """The original summed raw factors: kron(ΣwA, ΣwB) ≠ Σ w kron(A, B) (and likewise for Hadamard)."""
    w = [0.5, 0.5]
    if kind == "lokr":
        m = [lokr(1, alpha=2.0), lokr(10, alpha=2.0)]
        naive = torch.kron(sum(x * mi.w1 for x, mi in zip(w, m)),
                           sum(x * mi.w2a for x, mi in zip(w, m)) @ sum(x * mi.w2b for x, mi in zip(w, m)))
    else:
        m = [loha(1, alpha=3.0), loha(10, alpha=3.0)]
        s = lambda attr: sum(x * getattr(mi, attr) for x, mi in zip(w, m))  # noqa: E731
        naive = (s("w1a") @ s("w1b")) * (s("w2a") @ s("w2b"))
    truth = sum(x * dense(mi) for x, mi in zip(w, m)).double()
    naive_err = float((naive.double() * m[0].scale - truth).norm() / truth.norm())
    ours = fused_dense(m, w, "weighted_sum")
    assert naive_err > 0.5
    assert float((ours - truth).norm() / truth.norm()) < 1e-5


def test_default_weights_are_equal():
    modules = COMBOS["loha_pair"][0]()
    got = fuse_models([as_set(m) for m in modules], None, "weighted_sum", output_format="full", device="cpu")
    want = 0.5 * (dense(modules[0]) + dense(modules[1]))
    torch.testing.assert_close(got.modules["mod"].delta(), want, rtol=1e-5, atol=1e-6)


def test_user_errors_are_one_line():
    sets = [as_set(lokr(1)), as_set(lokr(2)), as_set(lokr(3))]
    with pytest.raises(MergeCoreError, match=r"number of weights \(2\) must match number of models \(3\)"):
        fuse_models(sets, [0.5, 0.5])
    with pytest.raises(MergeCoreError, match="weights sum to 0"):
        fuse_models(sets[:2], [1.0, -1.0], "weighted_average")
    with pytest.raises(MergeCoreError, match="norm-threshold"):
        fuse_models(sets[:2], None, "min_max_norm", norm_threshold=0.0)
    with pytest.raises(MergeCoreError, match="unknown strategy"):
        fuse_models(sets[:2], None, "geometric")
    with pytest.raises(MergeCoreError, match="unknown output format"):
        fuse_models(sets[:2], None, output_format="loha")
    bad = LoraSet({"mod": LoRA(rnd(OUT, 2, seed=0), rnd(2, IN + 1, seed=1))}, Naming("kohya", "other", {}))
    with pytest.raises(MergeCoreError, match="module 'mod' is 24x20 in input 1 but 24x21 in input 2"):
        fuse_models([as_set(lora(1)), bad])
    sd15 = LoraSet({"mod": lora(2)}, Naming("kohya", "sd15", {}))
    with pytest.raises(MergeCoreError, match="different models: input 1 is other, input 2 is sd15"):
        fuse_models([as_set(lora(1)), sd15])


def test_progress_is_called_per_module_and_can_cancel():
    sets = [LoraSet({"x": lokr(1), "y": loha(2)}, Naming("kohya", "other", {})), as_set(lokr(3), "x")]
    calls = []
    fuse_models(sets, progress=lambda done, total, name: calls.append((done, total, name)), device="cpu")
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)] and {c[2] for c in calls} == {"x", "y"}  # as each is done

    def cancel(done, total, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fuse_models(sets, progress=cancel, device="cpu")


def test_dora_inputs_need_an_explicit_choice():
    m = lokr(1)
    m.dora_scale = torch.ones(OUT, 1)
    sets = [as_set(m), as_set(lokr(2))]
    with pytest.raises(MergeCoreError, match="DoRA"):
        fuse_models(sets, device="cpu")
    res = fuse_models(sets, [1.0, 1.0], "weighted_sum", output_format="full", dora="ignore", device="cpu")
    torch.testing.assert_close(res.modules["mod"].delta(), dense(m) + dense(sets[1].modules["mod"]),
                               rtol=1e-5, atol=1e-6)
