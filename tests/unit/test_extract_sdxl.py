"""extract_lora on a synthetic SDXL-layout pair: names, rank-k error vs the full SVD, the dynamic energy rank,
the TE2 q/k/v split, diffs for 1-D tensors and biases, unchanged layers, LoCon conv rank, --diff-only."""
from __future__ import annotations

import pytest
import torch

from extract_bake_fixtures import (BIAS, IN_PROJ, IN_PROJ_BIAS, LAYERS, NORM, QKV, TE2, TINY, UNCHANGED,
                                   dense_delta, lora_delta, optimal_error, sdxl_pair, singular_values)
from merge_core.adapters import FullDiff, LoRA
from merge_core.checkpoint.lora_names import targets_of
from merge_core.extract import DictSource, extract_lora
from merge_core.keys.sdxl_table import sdxl_modules
from merge_core.lowrank import RankRule

RANK = 16
MODULES = list(LAYERS) + QKV


@pytest.fixture(scope="module")
def pair():
    return sdxl_pair(seed=1)


@pytest.fixture(scope="module")
def spectra(pair):
    """Full-SVD singular values of every module's ΔW (the reference)."""
    base, tuned = pair
    return {name: singular_values(dense_delta(base, tuned, name)) for name in MODULES}


@pytest.fixture(scope="module")
def fixed(pair):
    base, tuned = pair
    return extract_lora(DictSource(base), DictSource(tuned), RankRule(rank=RANK), device="cpu", seed=3)


def test_every_sdxl_table_module_gets_its_kohya_name():
    """Checkpoint keys (UNet, CLIP-L, OpenCLIP-G split) and ComfyUI keys both name each table module exactly."""
    prefix = {"unet": ("diffusion_model.", "model.diffusion_model."),
              "te1": ("clip_l.transformer.text_model.", "conditioner.embedders.0.transformer.text_model.")}
    openclip = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for name, spec in sdxl_modules().items():
        assert [t.name for t in targets_of(spec.key, spec.shape, True)] == [name]
        if spec.group in prefix:
            comfy, ckpt = prefix[spec.group]
            assert [t.name for t in targets_of(ckpt + spec.key[len(comfy):], spec.shape, True)] == [name]
            continue
        layer, part = spec.key.split(".encoder.layers.")[1].split(".", 1)
        part = part[: -len(".weight")]
        if part in openclip:
            key = f"{TE2}transformer.resblocks.{layer}.{openclip[part]}.weight"
            assert [t.name for t in targets_of(key, spec.shape, True)] == [name]
        else:
            key = f"{TE2}transformer.resblocks.{layer}.attn.in_proj_weight"
            names = [t.name for t in targets_of(key, (3 * spec.shape[0], spec.shape[1]), True)]
            assert name in names and len(names) == 3


def test_rank_k_error_within_two_percent_of_optimal(pair, fixed, spectra):
    base, tuned = pair
    for name in MODULES:
        m = fixed.modules[name]
        assert isinstance(m, LoRA) and m.rank == RANK and m.alpha == RANK
        ref = dense_delta(base, tuned, name).double()
        err = float((lora_delta(m) - ref).norm() / ref.norm())
        opt = optimal_error(spectra[name], RANK)
        assert err <= 1.02 * opt, (name, err, opt)
        row = next(r for r in fixed.report.modules if r.name == name and r.kind == "lora")
        assert row.rel_error == pytest.approx(err, rel=1e-3)


def test_dynamic_rank_is_the_energy_rank(pair, spectra):
    base, tuned = pair
    rule = RankRule(None, energy=0.9, min_rank=1, max_rank=64)
    res = extract_lora(DictSource(base), DictSource(tuned), rule, device="cpu")
    ranks = set()
    for name in MODULES:
        s2 = spectra[name] ** 2
        share = torch.cumsum(s2, 0) / s2.sum()
        k = int((share < 0.9).sum()) + 1
        assert abs(float(share[k - 1]) - 0.9) > 1e-4 and (k == 1 or abs(float(share[k - 2]) - 0.9) > 1e-4)
        assert res.modules[name].rank == min(max(k, 1), 64), name
        ranks.add(k)
    assert len(ranks) > 3  # the spectra really differ


def test_te2_in_proj_is_split_into_q_k_v():
    """Exact rank-8 deltas: each q/k/v LoRA reproduces its own block of in_proj, biases split the same way."""
    base, tuned = sdxl_pair(seed=2, low_rank=8)
    res = extract_lora(DictSource(base), DictSource(tuned), RankRule(rank=8), device="cpu")
    full = (tuned[IN_PROJ] - base[IN_PROJ]).double()
    full_b = tuned[IN_PROJ_BIAS] - base[IN_PROJ_BIAS]
    for i, name in enumerate(QKV):
        m = res.modules[name]
        torch.testing.assert_close(lora_delta(m), full[1280 * i:1280 * (i + 1)], rtol=0, atol=1e-6)
        torch.testing.assert_close(m.diff_b, full_b[1280 * i:1280 * (i + 1)])
    out_proj = "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"
    torch.testing.assert_close(lora_delta(res.modules[out_proj]), dense_delta(base, tuned, out_proj).double(),
                               rtol=0, atol=1e-6)


def test_openclip_mlp_and_text_projection_names_and_orientation():
    gen = torch.Generator().manual_seed(0)
    block = f"{TE2}transformer.resblocks.3."
    keys = {block + "mlp.c_fc.weight": (64, 16), block + "mlp.c_proj.weight": (16, 64), f"{TE2}text_projection": (16, 24),
            f"{TE2}ln_final.weight": (16,), f"{TE2}positional_embedding": (77, 16), f"{TE2}logit_scale": ()}
    base = {k: torch.randn(s, generator=gen) for k, s in keys.items()}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    res = extract_lora(DictSource(base), DictSource(tuned), RankRule(rank=4), device="cpu")
    assert set(res.modules) == {"lora_te2_text_model_encoder_layers_3_mlp_fc1",
                                "lora_te2_text_model_encoder_layers_3_mlp_fc2", "lora_te2_text_projection",
                                "text_encoders.clip_g.transformer.text_model.final_layer_norm",
                                "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding"}
    # ComfyUI's text_projection weight is the transpose of OpenCLIP's (x @ P)
    assert res.modules["lora_te2_text_projection"].weight_shape == (24, 16)
    assert res.report.extra["skipped"]["scalar"] == 1  # logit_scale


def test_one_d_weights_biases_and_unchanged_layers(pair, fixed):
    base, tuned = pair
    norm = fixed.modules["lora_unet_input_blocks_4_1_norm"]
    assert isinstance(norm, FullDiff)
    torch.testing.assert_close(norm.diff, tuned[NORM] - base[NORM])
    ff2 = fixed.modules["lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2"]
    torch.testing.assert_close(ff2.diff_b, tuned[BIAS] - base[BIAS])
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k" not in fixed.modules
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.weight" in \
        fixed.report.extra["skipped_keys"]["unchanged"]
    tiny = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v"
    assert tiny in fixed.modules
    small = {TINY: base[TINY], UNCHANGED: base[UNCHANGED], NORM: base[NORM]}
    res = extract_lora(DictSource(small), DictSource({k: tuned[k] for k in small}), min_diff=1e-4, device="cpu")
    assert set(res.modules) == {"lora_unet_input_blocks_4_1_norm"}


def test_conv_layers_use_their_own_rank(pair, spectra):
    base, tuned = pair
    name = "lora_unet_input_blocks_1_0_in_layers_2"
    only = {LAYERS[name][0]}
    res = extract_lora(DictSource({k: base[k] for k in only}), DictSource({k: tuned[k] for k in only}),
                       RankRule(rank=16), conv_rank=6, device="cpu")
    m = res.modules[name]
    assert m.up.shape == (320, 6, 1, 1) and m.down.shape == (6, 320, 3, 3)
    ref = dense_delta(base, tuned, name).double()
    assert float((lora_delta(m) - ref).norm() / ref.norm()) <= 1.02 * optimal_error(spectra[name], 6)


def test_diff_only_keeps_every_delta_whole(pair):
    base, tuned = pair
    res = extract_lora(DictSource(base), DictSource(tuned), diff_only=True, device="cpu")
    assert all(isinstance(m, FullDiff) for m in res.modules.values())
    for name in LAYERS:
        torch.testing.assert_close(res.modules[name].diff, dense_delta(base, tuned, name))


def test_text_encoders_can_be_left_out(pair):
    base, tuned = pair
    res = extract_lora(DictSource(base), DictSource(tuned), diff_only=True, text_encoders=False, device="cpu")
    assert res.modules and all(n.startswith("lora_unet_") for n in res.modules)
    assert res.report.extra["skipped"]["text_encoder"] == 4  # TE1 q_proj, TE2 out_proj, in_proj weight and bias


def test_identical_models_are_an_error():
    from merge_core.errors import MergeCoreError

    w = {UNCHANGED: torch.ones(4, 4)}
    with pytest.raises(MergeCoreError, match="nothing to extract"):
        extract_lora(DictSource(w), DictSource(dict(w)), device="cpu")


def test_target_size_reads_each_model_once_and_reports_exact_errors(pair, spectra):
    """A size budget makes every entry in one read of each model; each LoRA's reported error is its true error
    (from σ, checked against the dense ΔW here) and stays within 2 % of the optimal at its allocated rank."""
    from collections import Counter

    base, tuned = pair
    reads = Counter()

    def counted(state, tag):
        return DictSource({k: (lambda k=k: reads.update([(tag, k)]) or state[k]) for k in state},
                          {k: tuple(v.shape) for k, v in state.items()})

    rule = RankRule(None, energy=1.0, min_rank=1, max_rank=48)
    res = extract_lora(counted(base, "base"), counted(tuned, "tuned"), rule, device="cpu", seed=3,
                       target_size=600_000)
    assert set(reads.values()) == {1} and len(reads) == 2 * len(base)
    budget = res.report.extra["size_budget"]
    assert budget["file_bytes"] <= 600_000 and budget["energy_kept"] > budget["uniform_energy_kept"]
    ranks = set()
    for name in MODULES:
        m = res.modules[name]
        ref = dense_delta(base, tuned, name).double()
        err = float((lora_delta(m) - ref).norm() / ref.norm())
        row = next(r for r in res.report.modules if r.name == name and r.kind == "lora")
        assert row.rank == m.rank and row.rel_error == pytest.approx(err, rel=1e-3, abs=1e-6)
        assert err <= 1.02 * optimal_error(spectra[name], m.rank) + 1e-6, (name, err)
        ranks.add(m.rank)
    assert len(ranks) > 1 and max(ranks) <= 48
