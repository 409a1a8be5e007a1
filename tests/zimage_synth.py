"""Synthetic Z-Image LoRAs of a tiny Z-Image (width D) named ComfyUI's way (kohya, or `diffusion_model.` as
ComfyUI's "Extract and Save Lora" writes) and the diffusers way (AI-Toolkit's `diffusion_model.`, SimpleTuner's
`lycoris_`), each with the dense ΔW it puts on every kohya-named weight (rows placed by hand here)."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from flux_synth import pair

D = 16  # width of the tiny model: attention q|k|v rows 3D, feed_forward.w1 rows 3D
# the tiny Z-Image (a Lumina 2 NextDiT with Z-Image's modulation) as ComfyUI builds it from this config
CONFIG = dict(image_model="lumina2", patch_size=2, in_channels=4, dim=D, cap_feat_dim=8, n_layers=1,
              n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, axes_dims=[2, 2, 4], axes_lens=[8, 8, 8],
              rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
              multiple_of=8)

# kohya module -> ComfyUI path, rows (every one reads D columns)
COMFY = {"layers_0_attention_qkv": ("layers.0.attention.qkv", 3 * D),
         "layers_0_attention_out": ("layers.0.attention.out", D),
         "layers_0_feed_forward_w1": ("layers.0.feed_forward.w1", 3 * D),
         "noise_refiner_0_attention_qkv": ("noise_refiner.0.attention.qkv", 3 * D),
         "final_layer_linear": ("final_layer.linear", D), "x_embedder": ("x_embedder", D)}
# diffusers module -> (kohya module, first row, rows)
DIFFUSERS = {"layers.0.attention.to_q": ("layers_0_attention_qkv", 0, D),
             "layers.0.attention.to_v": ("layers_0_attention_qkv", 2 * D, D),
             "layers.0.attention.to_out.0": ("layers_0_attention_out", 0, D),
             "layers.0.feed_forward.w1": ("layers_0_feed_forward_w1", 0, 3 * D),
             "context_refiner.0.attention.to_k": ("context_refiner_0_attention_qkv", D, D),
             "all_final_layer.2-1.linear": ("final_layer_linear", 0, D),
             "all_x_embedder.2-1": ("x_embedder", 0, D)}
ROWS = {"layers_0_attention_qkv": 3 * D, "layers_0_attention_out": D, "layers_0_feed_forward_w1": 3 * D,
        "context_refiner_0_attention_qkv": 3 * D, "final_layer_linear": D, "x_embedder": D}


def comfy_file(path, seed: int = 1, bfl: bool = True) -> dict[str, torch.Tensor]:
    """ComfyUI-named Z-Image LoRA, rank 4, α 2 (`diffusion_model.<path>`, or kohya's names): the dense ΔW per
    kohya module."""
    deltas, sd = {}, {}
    for i, (name, (comfy_path, rows)) in enumerate(COMFY.items()):
        up, down = pair(rows, D, 4, seed * 100 + i)
        key = "diffusion_model." + comfy_path if bfl else "lora_unet_" + name
        sd.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)})
        deltas["lora_unet_" + name] = 0.5 * up.double() @ down.double()
    save_file(sd, str(path))
    return deltas


def diffusers_file(path, prefix: str = "diffusion_model.", sep: str = ".", seed: int = 2) -> dict[str, torch.Tensor]:
    """diffusers-named Z-Image LoRA (AI-Toolkit's names unless told), rank 2, no α (scale 1), PEFT suffixes: the
    dense ΔW per kohya module, each part in its rows."""
    deltas, sd = {}, {}
    for i, (name, (kohya, first, rows)) in enumerate(DIFFUSERS.items()):
        up, down = pair(rows, D, 2, seed * 100 + i)
        key = prefix + name.replace(".", sep)
        sd.update({f"{key}.lora_B.weight": up, f"{key}.lora_A.weight": down})
        delta = deltas.setdefault("lora_unet_" + kohya, torch.zeros(ROWS[kohya], D, dtype=torch.float64))
        delta[first:first + rows] += up.double() @ down.double()
    save_file(sd, str(path))
    return deltas
