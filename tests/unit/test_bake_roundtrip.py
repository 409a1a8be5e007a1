"""Extract a LoRA from a synthetic SDXL-layout pair, bake it back into the base: the result is the tuned model up
to the truncation error, each delta lands exactly where it belongs (TE2 q/k/v in in_proj blocks, text_projection
transposed), and everything else (untouched tensors, key order, metadata) is the base's own."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from extract_bake_fixtures import IN_PROJ, IN_PROJ_BIAS, LAYERS, QKV, TE2, UNCHANGED, sdxl_pair
from merge_core.bake import bake_lora
from merge_core.extract import extract_to_file
from merge_core.errors import NonFiniteError
from merge_core.files.metadata import RECIPE_KEY
from merge_core.files.tensor_source import read_safetensors_header
from merge_core.lowrank import RankRule

RANK = 12
PROJ = TE2 + "text_projection"


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    d = tmp_path_factory.mktemp("bake")
    base, tuned = sdxl_pair(seed=4, low_rank=40)
    gen = torch.Generator().manual_seed(9)
    base[PROJ] = torch.randn(1280, 64, generator=gen)  # OpenCLIP x @ P: ComfyUI's weight is Pᵀ
    tuned[PROJ] = base[PROJ] + 0.05 * torch.randn(1280, 3, generator=gen) @ torch.randn(3, 64, generator=gen)
    save_file(base, str(d / "base.safetensors"), metadata={"modelspec.title": "my base"})
    save_file(tuned, str(d / "tuned.safetensors"))
    extract_to_file(d / "base.safetensors", d / "tuned.safetensors", d / "lora.safetensors", "fp32",
                    rule=RankRule(rank=RANK), device="cpu")
    report = bake_lora(d / "base.safetensors", d / "lora.safetensors", d / "baked.safetensors", device="cpu")
    return d, base, tuned, load_file(str(d / "lora.safetensors")), load_file(str(d / "baked.safetensors")), report


def lora_dense(lora: dict, name: str) -> torch.Tensor:
    up, down = lora[f"{name}.lora_up.weight"].double(), lora[f"{name}.lora_down.weight"].double()
    scale = float(lora[f"{name}.alpha"]) / down.shape[0]
    return scale * up.flatten(1) @ down.flatten(1)


def test_baked_model_is_tuned_up_to_truncation(baked):
    """What is left, baked − tuned, is exactly the LoRA's truncation error ΔW − LoRA (near-optimal: see
    test_extract_sdxl), block by block."""
    _, base, tuned, lora, out, _ = baked
    parts = [(name, key, slice(None)) for name, (key, _) in LAYERS.items()]
    parts += [(n, IN_PROJ, slice(1280 * i, 1280 * (i + 1))) for i, n in enumerate(QKV)]
    for name, key, rows in parts:
        d = (tuned[key] - base[key])[rows].flatten(1).double()
        left = float((out[key][rows] - tuned[key][rows]).flatten(1).norm() / d.norm())
        truncation = float((d - lora_dense(lora, name)).norm() / d.norm())
        assert 0 < truncation < 0.8 and left == pytest.approx(truncation, rel=1e-3), name
    torch.testing.assert_close(out[IN_PROJ_BIAS], tuned[IN_PROJ_BIAS])
    torch.testing.assert_close(out[PROJ], tuned[PROJ], rtol=0, atol=1e-5)  # rank 3 < 12: exact


def test_each_delta_lands_in_its_place(baked):
    _, base, _, lora, out, _ = baked
    for name, (key, shape) in LAYERS.items():
        expect = base[key].double() + lora_dense(lora, name).reshape(shape)
        torch.testing.assert_close(out[key].double(), expect, rtol=0, atol=2e-6)
    blocks = torch.cat([lora_dense(lora, n) for n in QKV])
    torch.testing.assert_close(out[IN_PROJ].double(), base[IN_PROJ].double() + blocks, rtol=0, atol=2e-6)
    bias = torch.cat([lora[f"{n}.diff_b"] for n in QKV])
    torch.testing.assert_close(out[IN_PROJ_BIAS], base[IN_PROJ_BIAS] + bias)
    proj = lora_dense(lora, "lora_te2_text_projection")
    assert proj.shape == (64, 1280)
    torch.testing.assert_close(out[PROJ].double(), base[PROJ].double() + proj.T, rtol=0, atol=2e-6)


def test_base_layout_metadata_and_untouched_tensors_are_kept(baked):
    d, base, _, _, out, report = baked
    header, meta = read_safetensors_header(d / "baked.safetensors")
    assert list(header) == list(read_safetensors_header(d / "base.safetensors")[0])  # the base's key order
    assert meta["modelspec.title"] == "my base"
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["operation"] == "bake"
    assert [i["sha256"] for i in recipe["inputs"]] == [  # the base's too, hashed beside the bake
        hashlib.sha256((d / name).read_bytes()).hexdigest() for name in ("base.safetensors", "lora.safetensors")]
    assert torch.equal(out[UNCHANGED], base[UNCHANGED])
    assert all(out[k].dtype == base[k].dtype for k in base)
    assert report["skipped"] == [] and report["base_keys"] == len(base)
    assert report["patched_keys"] == len(base) - 1  # all but the unchanged layer


def test_a_non_finite_strength_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(NonFiniteError, match="the bake strength must be finite, got nan"):
        bake_lora(tmp_path / "no_base.safetensors", tmp_path / "no_lora.safetensors", tmp_path / "out.safetensors",
                  alpha=float("nan"))
    assert not list(tmp_path.iterdir())


def test_a_lora_holding_nan_is_refused_naming_the_module(baked, tmp_path):
    d, lora = baked[0], dict(baked[3])
    key = next(k for k in lora if k.endswith(".lora_down.weight"))
    lora[key] = lora[key].clone()
    lora[key][0, 0] = float("nan")
    save_file(lora, str(tmp_path / "nan.safetensors"))
    name = key[: -len(".lora_down.weight")]
    with pytest.raises(NonFiniteError, match=f"module '{name}' of .*nan.safetensors holds NaN or infinite values"):
        bake_lora(d / "base.safetensors", tmp_path / "nan.safetensors", tmp_path / "out.safetensors", device="cpu")
    assert not (tmp_path / "out.safetensors").exists()
