"""A diffusion transformer saved on its own with BFL's names (Flux as Black Forest Labs ships it:
`double_blocks.0.img_attn.qkv.weight`, no prefix) is placed where ComfyUI holds it, under `diffusion_model.`:
extract names its modules `lora_unet_…` (what ComfyUI's LoRA loader maps), and bake finds a kohya Flux
LoRA's layers in it.  An extract then a bake gives the tuned file back."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from merge_core.cli import main
from merge_core.lora_file import load_lora

# key -> shape: a tiny Flux with BFL's names (hidden 32)
KEYS = {"img_in.weight": (32, 4), "img_in.bias": (32,), "double_blocks.0.img_attn.qkv.weight": (96, 32),
        "double_blocks.0.img_attn.qkv.bias": (96,), "double_blocks.0.img_attn.norm.key_norm.scale": (16,),
        "single_blocks.0.linear1.weight": (224, 32), "final_layer.linear.weight": (4, 32)}


def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(*s, generator=g) for k, s in KEYS.items()}
    tuned = {}
    for k, v in base.items():  # low-rank weight changes (extracted as LoRAs at rank 4), small vector ones
        change = (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
                  if v.dim() == 2 else torch.randn(v.shape, generator=g))
        tuned[k] = v + 0.1 * change
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return base, tuned


def test_extract_names_a_bare_flux_transformer_as_comfyui_maps_it_and_bake_reverses_it(tmp_path):
    _, tuned = pair(tmp_path)
    lora, baked = tmp_path / "lora.safetensors", tmp_path / "baked.safetensors"
    assert main(["extract", "--source-model", str(tmp_path / "base.safetensors"), "--target-model",
                 str(tmp_path / "tuned.safetensors"), "--rank", "4", "--output-dtype", "fp32", "-o", str(lora)]) == 0
    assert set(load_lora(lora).modules) == {
        "lora_unet_img_in", "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
        "lora_unet_final_layer_linear", "diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"}
    assert load_lora(lora).modules["lora_unet_double_blocks_0_img_attn_qkv"].kind == "lora"
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model", str(lora),
                 "--output-dtype", "fp32", "-o", str(baked)]) == 0
    got = load_file(str(baked))
    assert set(got) == set(tuned)
    for k, v in tuned.items():
        assert torch.allclose(got[k], v, atol=1e-5), k
