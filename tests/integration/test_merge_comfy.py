"""Merged SDXL files load in a real ComfyUI (0.3.75, in-process, meta-device model) with zero
"lora key not loaded": full 986-module merges (rank-4 inputs) by rsvd and concat, and a LoCon merge, where the
delta ComfyUI applies from the written file is the merge's T = Σ wᵢΔWᵢ (concat: exactly); and every other
method's file, on a sample of the modules (linear and LoCon conv), with every module patched."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from comfy_host import load_lora_with_comfy  # noqa: E402
from comfy_host.fixtures import comfy_inprocess  # noqa: E402,F401
from merge_core.lora_file import load_lora, save_lora  # noqa: E402
from merge_core.merge import merge_loras  # noqa: E402
from synth import sdxl_lora, sdxl_specs  # noqa: E402

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two full kohya SDXL LoRAs (986 modules, rank 4, different alphas) and a pair with the LoCon extras."""
    d = tmp_path_factory.mktemp("merge_comfy")
    plain, locon = sdxl_specs(), sdxl_specs(locon=True)
    assert len(plain) == 986
    paths = {}
    for key, specs in (("plain", plain), ("locon", locon)):
        for i, (alpha, seed) in enumerate(((2.0, 1), (4.0, 2))):
            p = d / f"{key}_{i}.safetensors"
            save_lora(sdxl_lora(specs, rank=4, alpha=alpha, seed=seed), p)
            paths.setdefault(key, []).append(p)
    return paths


@pytest.mark.parametrize("key,method", [("plain", "rsvd"), ("plain", "concat"), ("locon", "rsvd")])
def test_merged_file_loads_with_no_missing_keys(comfy_inprocess, inputs, tmp_path, key, method):  # noqa: F811
    import comfy.lora

    sets = [load_lora(p) for p in inputs[key]]
    weights = [0.7, -0.4]
    result = merge_loras(sets, method, weights=weights, device="cpu")
    out = result.save(tmp_path / f"{method}.safetensors")
    sd = load_file(str(out))
    patches, not_loaded = load_lora_with_comfy(sd)
    assert not_loaded == []
    assert len(patches) == len(sets[0].modules) == len(result.modules)

    from comfy_host import sdxl_lora_key_map

    key_map = sdxl_lora_key_map()
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                 "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2"):
        shape = sets[0].modules[name].weight_shape
        T = sum(w * s.modules[name].delta() for w, s in zip(weights, sets))
        model_key = key_map[name]
        applied = comfy.lora.calculate_weight([(1.0, patches[model_key], 1.0, None, None)], torch.zeros(shape),
                                              model_key)
        err = float((applied - T).norm() / T.norm())
        assert err < 2e-3  # fp16 file; rsvd keeps rank 8 = the whole sum of two rank-4 inputs


@pytest.mark.parametrize("method", ["svd", "weighted_avg", "geometric_mean", "ties", "dare", "dare_ties"])
def test_every_other_method_writes_a_file_comfyui_loads_whole(comfy_inprocess, tmp_path, method):  # noqa: F811
    """Each method's file through ComfyUI's loader: every module patched, no key left over.  A sample of the
    SDXL modules (12 per UNet/TE1/TE2 group, linear and LoCon conv) keeps the dense methods quick; the names
    and layouts are those of the full merges above."""
    specs = sdxl_specs(per_group=12, locon=True)
    sets = []
    for i, (alpha, seed) in enumerate(((2.0, 1), (4.0, 2))):
        save_lora(sdxl_lora(specs, rank=4, alpha=alpha, seed=seed), tmp_path / f"in_{i}.safetensors")
        sets.append(load_lora(tmp_path / f"in_{i}.safetensors"))
    result = merge_loras(sets, method, weights=[0.7, -0.4], device="cpu")
    out = result.save(tmp_path / f"{method}.safetensors")
    patches, not_loaded = load_lora_with_comfy(load_file(str(out)))
    assert not_loaded == []
    assert len(patches) == len(result.modules) == len(specs)
