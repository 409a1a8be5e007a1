"""Fusion outputs load in the real ComfyUI with zero "lora key not loaded", and the delta ComfyUI applies
(its own LoKr α/dim rule, LoRA α/r, diff) is the one we meant: SDXL-named LoKr/LoHa inputs, every form."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from comfy_host import load_lora_with_comfy  # noqa: E402
from merge_core.fuse import fuse_models  # noqa: E402
from merge_core.keys.sdxl_table import sdxl_modules  # noqa: E402
from merge_core.lora_file import load_lora  # noqa: E402
from merge_core.lowrank import RankRule  # noqa: E402

pytestmark = pytest.mark.comfyui

FACTOR = 8  # every SDXL linear dimension is a multiple of 8: w1 8×8, w2 (out/8)×(in/8)


def specs(per_group=None):
    rows = [s for s in sdxl_modules().values() if not s.locon]
    if per_group is None:
        return rows
    picked, count = [], {}
    for s in rows:
        if count.get(s.group, 0) < per_group:
            count[s.group] = count.get(s.group, 0) + 1
            picked.append(s)
    return picked


def rnd(*shape, gen):
    return torch.randn(*shape, generator=gen) * 0.1


def lokr_sd(rows, seed, rank=1):
    gen, sd = torch.Generator().manual_seed(seed), {}
    for s in rows:
        out, inn = s.shape
        sd.update({f"{s.name}.lokr_w1": rnd(FACTOR, FACTOR, gen=gen),
                   f"{s.name}.lokr_w2_a": rnd(out // FACTOR, rank, gen=gen),
                   f"{s.name}.lokr_w2_b": rnd(rank, inn // FACTOR, gen=gen), f"{s.name}.alpha": torch.tensor(2.0)})
    return sd


def loha_sd(rows, seed, rank=1):
    gen, sd = torch.Generator().manual_seed(seed), {}
    for s in rows:
        out, inn = s.shape
        sd.update({f"{s.name}.hada_w1_a": rnd(out, rank, gen=gen), f"{s.name}.hada_w1_b": rnd(rank, inn, gen=gen),
                   f"{s.name}.hada_w2_a": rnd(out, rank, gen=gen), f"{s.name}.hada_w2_b": rnd(rank, inn, gen=gen),
                   f"{s.name}.alpha": torch.tensor(0.5)})
    return sd


def dense_of(sd, name) -> torch.Tensor:
    """ΔW of an input module from its tensors, by the formulas ComfyUI applies."""
    if f"{name}.lokr_w1" in sd:
        w2a, w2b = sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"]
        return sd[f"{name}.alpha"] / w2b.shape[0] * torch.kron(sd[f"{name}.lokr_w1"], w2a @ w2b)
    r = sd[f"{name}.hada_w1_b"].shape[0]
    return (sd[f"{name}.alpha"] / r * (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"])
            * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"]))


def comfy_delta(patch, key, shape) -> torch.Tensor:
    import comfy.lora

    return comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], torch.zeros(shape), key)


def fuse_files(tmp_path, sds, form, weights):
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"in{i}.safetensors")
        save_file(sd, str(paths[-1]))
    sets = [load_lora(p) for p in paths]
    res = fuse_models(sets, weights, "weighted_sum", output_format=form,
                      rule=RankRule(energy=1.0, min_rank=1, max_rank=64), device="cpu")
    out = res.save(tmp_path / f"fused_{form}.safetensors", dtype="fp32")
    return res, load_file(str(out))


INPUTS = {"lokr": lambda rows: [lokr_sd(rows, 1), lokr_sd(rows, 2, rank=2)],
          "loha": lambda rows: [loha_sd(rows, 3), loha_sd(rows, 4)],
          "mixed": lambda rows: [lokr_sd(rows, 5), loha_sd(rows, 6)]}


@pytest.mark.parametrize("form", ["lokr", "lora", "full", "auto"])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_fused_subset_loads_and_applies_what_we_meant(tmp_path, kind, form):
    rows = specs(per_group=3)
    sds = INPUTS[kind](rows)
    weights = [0.6, 0.4]
    res, written = fuse_files(tmp_path, sds, form, weights)
    patches, not_loaded = load_lora_with_comfy(written)
    assert not_loaded == []
    assert set(patches) == {s.key for s in rows}
    for s in rows:
        got = comfy_delta(patches[s.key], s.key, s.shape)
        ours = res.modules[s.name].delta()  # what we intended to write, scale included
        torch.testing.assert_close(got, ours, rtol=1e-4, atol=1e-6)
        row = next(m for m in res.report.modules if m.name == s.name)
        truth = sum(w * dense_of(sd, s.name) for w, sd in zip(weights, sds))
        err = float((got - truth).norm() / truth.norm())
        assert err == pytest.approx(row.rel_error, abs=1e-4)
        if row.kind != "lokr":
            assert err < 1e-4  # lora at full rank and full are exact


def test_all_986_sdxl_modules_load_as_lokr(tmp_path):
    rows = specs()
    assert len(rows) == 986
    res, written = fuse_files(tmp_path, [lokr_sd(rows, 7), lokr_sd(rows, 8)], "lokr", [0.5, 0.5])
    patches, not_loaded = load_lora_with_comfy(written)
    assert not_loaded == []
    assert len(patches) == 986 and {m.kind for m in res.modules.values()} == {"lokr"}
