"""A kohya-named and a diffusers-named Flux LoRA, merged, do in a real ComfyUI (0.3.75, in-process) what the two
stacked in LoraLoader do: on a tiny Flux ComfyUI builds itself (weights zeroed, so a patched weight is the ΔW
ComfyUI applies), the merged file's patches equal the stack's on every weight, with ComfyUI's own slices of
the fused q|k|v / linear1 weights and its shift/scale swap of norm_out; no "lora key not loaded"."""
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
from flux_synth import CONFIG, diffusers_file, kohya_file  # noqa: E402
from merge_core.cli import main  # noqa: E402

pytestmark = pytest.mark.comfyui
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def flux(comfy_inprocess):  # noqa: F811
    """ComfyUI's Flux model of flux_synth.CONFIG on the CPU, weights zeroed, in a ModelPatcher; and its LoRA key
    map (model_lora_keys_unet)."""
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(CONFIG, dtype=torch.float32))
    assert type(config).__name__ == "Flux"
    model = config.get_model({}, device=CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    key_map = {}
    comfy.lora.model_lora_keys_unet(model, key_map)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU), key_map


def applied(flux, loras) -> dict[str, torch.Tensor]:
    """The weight ComfyUI computes for every patched key after LoraLoader's load_lora_for_models of each
    (file, strength) in turn."""
    import comfy.lora
    import comfy.sd

    patcher, _ = flux
    for path, strength in loras:
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, load_file(str(path)), strength, 0)
    weights = patcher.model.state_dict()
    return {key: comfy.lora.calculate_weight(patches, torch.zeros_like(weights[key]), key)
            for key, patches in patcher.patches.items()}


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_kohya_and_diffusers_flux_merge_applies_as_the_stack_in_comfyui(flux, tmp_path, method):
    kohya_file(tmp_path / "k.safetensors")
    diffusers_file(tmp_path / "d.safetensors")
    out = tmp_path / "merged.safetensors"
    extra = ["--rank", "16"] if method == "svd" else []  # above the sum's rank 8: exact
    assert main(["merge", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"), "--method", method,
                 "--weights", "0.8", "-0.5", "--dtype", "fp32", "-o", str(out), *extra]) == 0
    _, not_loaded = load_lora_with_comfy(load_file(str(out)), flux[1])
    assert not_loaded == []
    stacked = applied(flux, [(tmp_path / "k.safetensors", 0.8), (tmp_path / "d.safetensors", -0.5)])
    merged = applied(flux, [(out, 1.0)])
    assert len(stacked) == 8 and set(merged) == set(stacked)  # every weight either file patches
    for key, want in stacked.items():
        assert float((merged[key] - want).norm()) <= 1e-5 * float(want.norm()), key
