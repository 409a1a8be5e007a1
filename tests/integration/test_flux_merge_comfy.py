"""A kohya-named and a diffusers-named Flux LoRA, merged, do in a real ComfyUI (0.3.75, in-process) what the two
stacked in LoraLoader do: on a tiny Flux ComfyUI builds itself (weights zeroed, so a patched weight is the ΔW
ComfyUI applies), the merged file's patches equal the stack's on every weight, with ComfyUI's own slices of
the fused q|k|v / linear1 weights and its shift/scale swap of norm_out; no "lora key not loaded"."""
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


def test_a_lora_extracted_from_bare_flux_transformers_patches_every_changed_weight(flux, tmp_path):
    """Base and tuned saved as BFL ships Flux (no prefix); the extracted LoRA, through ComfyUI's LoraLoader on
    the base, gives the tuned weights back (changes of rank 2 at extraction rank 4: exact up to fp32)."""
    patcher, key_map = flux
    g = torch.Generator().manual_seed(0)
    base = {k[len("diffusion_model."):]: torch.randn(v.shape, generator=g)
            for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
    tuned = {k: v + 0.1 * (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v[0].numel(), generator=g)
                           ).reshape(v.shape) if v.dim() >= 2 else v + 0.1 * torch.randn(v.shape, generator=g)
             for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    lora = tmp_path / "lora.safetensors"
    assert main(["extract", "--source-model", str(tmp_path / "base.safetensors"), "--target-model",
                 str(tmp_path / "tuned.safetensors"), "--rank", "4", "--output-dtype", "fp32", "-o", str(lora)]) == 0
    patches, not_loaded = load_lora_with_comfy(load_file(str(lora)), key_map)
    assert not_loaded == []
    import comfy.lora

    patched = {}
    for k, adapter in patches.items():
        key = k if isinstance(k, str) else k[0]
        patched[key] = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)],
                                                   base[key[len("diffusion_model."):]].clone(), key)
    assert set(patched) == {"diffusion_model." + k for k in base}  # every tensor changed, every one patched
    for key, weight in patched.items():
        want = tuned[key[len("diffusion_model."):]]
        assert torch.allclose(weight, want, atol=1e-4 * float(want.abs().max())), key
