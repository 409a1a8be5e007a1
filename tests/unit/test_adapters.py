"""Every adapter kind's delta against a dense computation written here from the formulas in math.md."""
import pytest
import torch

from merge_core.adapters import FullDiff, LoHa, LoKr, LoRA, module_from_roles
from merge_core.errors import FormatError
from merge_core.lowrank import frob2
from synth import randn

ATOL = 1e-5


def close(a, b):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=ATOL, rtol=1e-5), (a - b).abs().max()


def check_operator(module, dense):
    """operator() is exactly the matrix form of the delta, and its norm is exact."""
    close(module.delta(), dense)
    close(module.operator().dense(), dense.flatten(1))
    assert frob2(module.operator()) == pytest.approx(float((dense.double() ** 2).sum()), rel=1e-5)


def test_lora_linear_alpha_scales_by_alpha_over_rank():
    up, down = randn(6, 3, seed=1), randn(3, 5, seed=2)
    check_operator(LoRA(up, down, alpha=1.5), (1.5 / 3) * up @ down)


def test_lora_without_alpha_has_scale_one():
    up, down = randn(6, 3, seed=1), randn(3, 5, seed=2)
    check_operator(LoRA(up, down, alpha=None), up @ down)


@pytest.mark.parametrize("k", [1, 3])
def test_locon_conv(k):
    up, down = randn(8, 4, 1, 1, seed=3), randn(4, 5, k, k, seed=4)
    dense = 0.5 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    m = LoRA(up, down, alpha=2.0)
    assert m.weight_shape == (8, 5, k, k)
    check_operator(m, dense)


def test_locon_tucker_mid():
    up, down, mid = randn(8, 4, 1, 1, seed=5), randn(4, 6, 1, 1, seed=6), randn(4, 4, 3, 3, seed=7)
    dense = (3.0 / 4) * torch.einsum("oa,abkl,bi->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    check_operator(LoRA(up, down, alpha=3.0, mid=mid), dense)


def test_loha_linear():
    w1a, w1b, w2a, w2b = randn(7, 3, seed=1), randn(3, 5, seed=2), randn(7, 2, seed=3), randn(2, 5, seed=4)
    dense = (4.0 / 3) * (w1a @ w1b) * (w2a @ w2b)
    m = LoHa(w1a, w1b, w2a, w2b, alpha=4.0)
    assert m.operator().inner_rank == 6  # r1·r2 via face-splitting
    check_operator(m, dense)


def test_loha_conv_flattened_factors_use_shape_hint():
    w1a, w1b, w2a, w2b = randn(7, 3, seed=1), randn(3, 5 * 9, seed=2), randn(7, 3, seed=3), randn(3, 5 * 9, seed=4)
    m = LoHa(w1a, w1b, w2a, w2b, alpha=None, shape_hint=(7, 5, 3, 3))
    check_operator(m, ((w1a @ w1b) * (w2a @ w2b)).reshape(7, 5, 3, 3))


def test_loha_tucker():
    t1, t2 = randn(3, 3, 3, 3, seed=1), randn(2, 2, 3, 3, seed=2)
    w1a, w1b = randn(3, 8, seed=3), randn(3, 6, seed=4)  # Tucker: w_a is [r, out]
    w2a, w2b = randn(2, 8, seed=5), randn(2, 6, seed=6)
    m1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
    m2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
    check_operator(LoHa(w1a, w1b, w2a, w2b, alpha=1.5, t1=t1, t2=t2), (1.5 / 3) * m1 * m2)


def test_lokr_full_w1_factorised_w2():
    w1, w2a, w2b = randn(4, 2, seed=1), randn(16, 3, seed=2), randn(3, 10, seed=3)
    check_operator(LoKr(w1=w1, w2a=w2a, w2b=w2b, alpha=6.0), (6.0 / 3) * torch.kron(w1, w2a @ w2b))


def test_lokr_factorised_w1_full_w2():
    w1a, w1b, w2 = randn(4, 2, seed=1), randn(2, 3, seed=2), randn(5, 6, seed=3)
    check_operator(LoKr(w1a=w1a, w1b=w1b, w2=w2, alpha=1.0), 0.5 * torch.kron(w1a @ w1b, w2))


def test_lokr_both_full_ignores_alpha():
    w1, w2 = randn(4, 2, seed=1), randn(5, 6, seed=3)
    check_operator(LoKr(w1=w1, w2=w2, alpha=123.0), torch.kron(w1, w2))


def test_lokr_both_factorised_uses_w2_rank():
    w1a, w1b, w2a, w2b = randn(4, 2, seed=1), randn(2, 3, seed=2), randn(5, 4, seed=3), randn(4, 6, seed=4)
    check_operator(LoKr(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, alpha=2.0), 0.5 * torch.kron(w1a @ w1b, w2a @ w2b))


def test_lokr_conv_full_w2():
    w1, w2 = randn(2, 3, seed=1), randn(4, 5, 3, 3, seed=2)
    dense = torch.kron(w1[:, :, None, None], w2)
    m = LoKr(w1=w1, w2=w2)
    assert m.weight_shape == (8, 15, 3, 3)
    check_operator(m, dense)


def test_lokr_tucker_t2():
    w1 = randn(2, 3, seed=1)
    t2, w2a, w2b = randn(3, 3, 3, 3, seed=2), randn(3, 4, seed=3), randn(3, 5, seed=4)
    w2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a).contiguous()
    check_operator(LoKr(w1=w1, w2a=w2a, w2b=w2b, t2=t2, alpha=1.5), 0.5 * torch.kron(w1[:, :, None, None], w2))


def test_full_diff_and_bias():
    d, b = randn(6, 5, seed=1), randn(6, seed=2)
    m = FullDiff(d, diff_b=b)
    check_operator(m, d)
    assert m.tensors()["diff_b"] is b


def test_roles_pick_the_kind_and_report_missing_tensors():
    assert module_from_roles("x", {"diff_b": randn(3)}).kind == "full"
    assert module_from_roles("x", {"hada_w1_a": randn(2, 1), "hada_w1_b": randn(1, 2),
                                   "hada_w2_a": randn(2, 1), "hada_w2_b": randn(1, 2)}).kind == "loha"
    with pytest.raises(FormatError, match="module 'x'.*lora_down.weight"):
        module_from_roles("x", {"lora_up.weight": randn(2, 1)})
    with pytest.raises(FormatError, match="lokr_w2"):
        module_from_roles("y", {"lokr_w1": randn(2, 2)})


@pytest.mark.parametrize("roles, message", [
    ({"lora_up.weight": randn(8, 4), "lora_down.weight": randn(5, 8)},
     "LoRA factors do not chain: 'lora_up.weight' (8, 4) with 'lora_down.weight' (5, 8)"),
    ({"lora_up.weight": randn(8, 0), "lora_down.weight": randn(0, 8)}, "'lora_up.weight' is float32 of shape (8, 0)"),
    ({"lora_up.weight": torch.tensor(1.0), "lora_down.weight": torch.tensor(1.0)}, "of shape ()"),
    ({"lora_up.weight": torch.ones(8, 4, dtype=torch.int32), "lora_down.weight": randn(4, 8)}, "is int32"),
    ({"lora_up.weight": randn(8, 4), "lora_down.weight": randn(4, 8), "alpha": torch.tensor([2.0, 3.0])},
     "alpha holds 2 values, not one"),
    ({"hada_w1_a": randn(8, 2), "hada_w1_b": randn(3, 8), "hada_w2_a": randn(8, 2), "hada_w2_b": randn(2, 8)},
     "LoHa factors do not chain"),
    ({"hada_w1_a": randn(8, 2), "hada_w1_b": randn(2, 8), "hada_w2_a": randn(6, 2), "hada_w2_b": randn(2, 8)},
     "LoHa branches differ in shape: (8, 8) and (6, 8)"),
])
def test_malformed_factors_are_one_clear_error_naming_the_module(roles, message):
    with pytest.raises(FormatError, match=r"^module 'm': .*" + message.replace("(", r"\(").replace(")", r"\)")):
        module_from_roles("m", roles)


def test_a_module_with_tensors_of_two_kinds_is_refused():
    roles = {"lora_up.weight": randn(8, 2), "lora_down.weight": randn(2, 8), "lokr_w1": randn(2, 2),
             "lokr_w2": randn(4, 4), "diff_b": randn(8)}
    with pytest.raises(FormatError, match=r"module 'm' holds tensors of 2 adapter kinds \(lokr, lora\)"):
        module_from_roles("m", roles)
    assert module_from_roles("m", {"lora_up.weight": randn(8, 2), "lora_down.weight": randn(2, 8),
                                   "diff_b": randn(8)}).kind == "lora"  # a bias delta goes with any kind
