"""A DoRA LoRA baked by merge_core equals what ComfyUI 0.3.75's own loader computes for the same base weights:
comfy.lora.load_lora on the file, then comfy.lora.calculate_weight per patched key (as ModelPatcher does, in
fp32), for a Linear and a 3×3 conv with kohya's per-column magnitude and a Linear with a per-row one."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.bake import bake_lora
from synth import randn

pytestmark = pytest.mark.comfyui

UNET = "diffusion_model."
LAYERS = {  # ComfyUI model key -> (kohya name, shape, magnitude shape)
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight":
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (640, 640), (1, 640)),
    "input_blocks.1.0.in_layers.2.weight": ("lora_unet_input_blocks_1_0_in_layers_2", (320, 320, 3, 3), (1, 320, 1, 1)),
    "input_blocks.4.1.proj_in.weight": ("lora_unet_input_blocks_4_1_proj_in", (640, 640), (640, 1)),
}


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_baked_dora_equals_comfyui_patched_weights(tmp_path, comfy_inprocess, strength):
    from comfy_host import load_lora_with_comfy
    import comfy.lora

    base, lora = {}, {}
    for i, (key, (name, shape, mshape)) in enumerate(LAYERS.items()):
        base["model." + UNET + key] = randn(*shape, seed=10 * i, scale=0.05)
        rank = 4
        up = randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), seed=10 * i + 1, scale=0.1)
        down = randn(rank, *shape[1:], seed=10 * i + 2, scale=0.1)
        lora |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(2.0),
                 f"{name}.dora_scale": randn(*mshape, seed=10 * i + 3).abs() + 0.5}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(lora, str(tmp_path / "dora.safetensors"))
    report = bake_lora(tmp_path / "base.safetensors", tmp_path / "dora.safetensors", tmp_path / "out.safetensors",
                       alpha=strength, device="cpu")
    assert report["skipped"] == [] and report["dora_modules"] == len(LAYERS)
    baked = load_file(str(tmp_path / "out.safetensors"))

    patches, not_loaded = load_lora_with_comfy(load_file(str(tmp_path / "dora.safetensors")))
    assert not_loaded == []
    for key in LAYERS:
        comfy_key = UNET + key
        weight = base["model." + comfy_key].clone()
        want = comfy.lora.calculate_weight([(strength, patches[comfy_key], 1.0, None, None)], weight, comfy_key)
        got = baked["model." + comfy_key]
        assert not torch.allclose(want, base["model." + comfy_key], atol=1e-3), key  # DoRA changed it
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
