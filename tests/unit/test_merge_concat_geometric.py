"""concat (exact, rank Σrᵢ, α = total rank) and geometric_mean (the seed's elementwise formula) against
references written here: torch.cat of the scaled factors / explicit signed roots of products."""
from __future__ import annotations

import pytest
import torch

from merge_core.adapters import LoHa
from merge_core.errors import MergeCoreError, ShapeMismatchError
from merge_core.merge import merge_loras
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import CONV, F64, NAMES, dense, gen, lora_set, random_lora, rel, shape_of, target


def test_concat_is_exact_with_mixed_ranks_negative_weights_and_conv():
    names = NAMES[:2] + [CONV]
    a = lora_set({n: random_lora(shape_of(n), 64, 16.0, seed=i) for i, n in enumerate(names)})
    b = lora_set({n: random_lora(shape_of(n), 32, None, seed=30 + i) for i, n in enumerate(names)})
    w = [0.8, -0.6]
    r = merge_loras([a, b], "concat", weights=w, device="cpu")
    for n in names:
        m = r.modules[n]
        assert m.rank == 96 and m.alpha == 96.0
        assert tuple(m.down.shape[1:]) == tuple(shape_of(n)[1:])  # conv stays a 3x3 LoCon
        assert rel(dense(m), target([a, b], w, n)) < 1e-6
    assert all(row.rel_error == 0.0 for row in r.report.modules)


def test_concat_folds_sqrt_of_scale_into_each_factor_with_the_sign_on_up_then_balances_each_term():
    n = NAMES[0]
    la, lb = random_lora(shape_of(n), 4, 2.0, seed=1), random_lora(shape_of(n), 4, 8.0, seed=2)
    r = merge_loras([lora_set({n: la}), lora_set({n: lb})], "concat", weights=[2.0, -0.5], device="cpu")
    m = r.modules[n]
    ga, gb = (2.0 * 2.0 / 4) ** 0.5, (0.5 * 8.0 / 4) ** 0.5  # √|w·α/r|
    ref_up = torch.cat([la.up * ga, -lb.up * gb], 1)
    ref_down = torch.cat([la.down * ga, lb.down * gb], 0)
    d = (ref_down.flatten(1).norm(dim=1) / ref_up.flatten(1).norm(dim=0)).sqrt()  # ‖up·d‖ = ‖down/d‖ per term
    assert torch.allclose(m.up, ref_up * d, atol=1e-7) and torch.allclose(m.down, ref_down / d[:, None], atol=1e-7)


def test_concat_takes_loha_in_its_exact_factored_form():
    n = NAMES[0]
    out, inn = shape_of(n)
    t = [torch.randn(*s, generator=gen(i)) * 0.1 for i, s in enumerate([(out, 2), (2, inn), (out, 3), (3, inn)])]
    loha = LoHa(*t, alpha=1.0)
    lora = random_lora(shape_of(n), 4, None, seed=9)
    r = merge_loras([lora_set({n: loha}), lora_set({n: lora})], "concat", device="cpu")
    ref = (1.0 / 2) * (t[0].to(F64) @ t[1].to(F64)) * (t[2].to(F64) @ t[3].to(F64)) + dense(lora)
    assert r.modules[n].rank == 2 * 3 + 4
    assert rel(dense(r.modules[n]), ref) < 1e-6


def signed_root(*factors):
    prod = torch.ones_like(factors[0], dtype=F64)
    for f in factors:
        prod = prod * f.to(F64)
    return torch.sign(prod) * prod.abs() ** (1.0 / len(factors))


def test_geometric_mean_is_the_elementwise_signed_root():
    n = NAMES[0]
    mods = [random_lora(shape_of(n), 8, a, seed=s) for a, s in ((4.0, 1), (8.0, 3), (None, 5))]
    w = [1.0, 0.5, -2.0]
    r = merge_loras([lora_set({n: m}) for m in mods], "geometric_mean", weights=w, device="cpu")
    g = [abs(wi * (1.0 if m.alpha is None else m.alpha / 8)) ** 0.5 for wi, m in zip(w, mods)]
    signs = [1.0 if wi * (1.0 if m.alpha is None else m.alpha / 8) > 0 else -1.0 for wi, m in zip(w, mods)]
    ref_up = signed_root(*[s * gi * m.up for s, gi, m in zip(signs, g, mods)])
    ref_down = signed_root(*[gi * m.down for gi, m in zip(g, mods)])
    m = r.modules[n]
    assert m.alpha == 8.0
    assert torch.allclose(m.up.to(F64), ref_up, rtol=1e-5, atol=1e-8)
    assert torch.allclose(m.down.to(F64), ref_down, rtol=1e-5, atol=1e-8)
    row = r.report.modules[0]
    assert row.rel_error == pytest.approx(rel(dense(m), target([lora_set({n: x}) for x in mods], w, n)), rel=1e-4)


def test_geometric_mean_of_one_input_is_its_scaled_copy():
    n = NAMES[0]
    m = random_lora(shape_of(n), 4, 2.0, seed=3)
    r = merge_loras([lora_set({n: m}), lora_set({NAMES[1]: random_lora(shape_of(NAMES[1]), 4, 2.0, seed=4)})],
                    "geometric_mean", weights=[0.5, 1.0], device="cpu")
    assert rel(dense(r.modules[n]), 0.5 * dense(m)) < 1e-6


def test_geometric_mean_refuses_different_ranks_naming_the_first_module():
    a = lora_set({n: random_lora(shape_of(n), 8, None, seed=i) for i, n in enumerate(NAMES[:3])})
    b = lora_set({NAMES[0]: random_lora(shape_of(NAMES[0]), 8, None, seed=7),
                  NAMES[1]: random_lora(shape_of(NAMES[1]), 4, None, seed=8),
                  NAMES[2]: random_lora(shape_of(NAMES[2]), 2, None, seed=9)})
    calls = []
    with pytest.raises(ShapeMismatchError, match=f"module '{NAMES[1]}' has rank 8 in input 1 but rank 4 in input 2"):
        merge_loras([a, b], "geometric_mean", device="cpu", progress=lambda *x: calls.append(x))
    assert calls == []  # refused before any module was computed


def test_geometric_mean_refuses_loha():
    n = NAMES[0]
    out, inn = shape_of(n)
    loha = LoHa(torch.ones(out, 2), torch.ones(2, inn), torch.ones(out, 2), torch.ones(2, inn))
    with pytest.raises(MergeCoreError, match="is loha"):
        merge_loras([lora_set({n: loha}), lora_set({n: random_lora(shape_of(n), 4, None, 1)})], "geometric_mean")
