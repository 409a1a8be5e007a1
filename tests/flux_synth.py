"""Synthetic Flux LoRAs of a tiny Flux (hidden width H) named the kohya, BFL, diffusers and OneTrainer ways,
each with the dense ΔW it puts on every kohya-named weight (rows placed by hand here, not by merge_core)."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

H = 8  # hidden width of the tiny model: q|k|v rows 3H, linear1 rows 7H (q, k, v, then the 4H MLP)
F64 = torch.float64
# the tiny Flux as ComfyUI builds it from this config (comfy.model_detection.model_config_from_unet_config)
CONFIG = dict(image_model="flux", guidance_embed=True, in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=8,
              hidden_size=H, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[1, 1, 2],
              theta=10000, qkv_bias=True, patch_size=1)
# input width of the weights that do not read the hidden state: linear2 reads attention and MLP (H + 4H),
# img_in the latent's 4 channels, guidance_in its 256 sinusoidal features
COLS = {"single_blocks_0_linear2": 5 * H, "img_in": 4, "guidance_in_in_layer": 256}


def pair(out: int, inn: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g), torch.randn(rank, inn, generator=g)


# kohya module -> BFL path, rows
KOHYA = {"double_blocks_0_img_attn_qkv": ("double_blocks.0.img_attn.qkv", 3 * H),
         "double_blocks_0_txt_attn_qkv": ("double_blocks.0.txt_attn.qkv", 3 * H),
         "single_blocks_0_linear1": ("single_blocks.0.linear1", 7 * H),
         "single_blocks_0_linear2": ("single_blocks.0.linear2", H),
         "final_layer_adaLN_modulation_1": ("final_layer.adaLN_modulation.1", 2 * H), "img_in": ("img_in", H)}


def kohya_file(path, seed: int = 1, bfl: bool = False, metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """kohya Flux LoRA, rank 4, α 2 (or BFL's dotted names, PEFT suffixes, α folded into up): the dense ΔW per
    kohya module."""
    deltas, sd = {}, {}
    for i, (name, (path_bfl, out)) in enumerate(KOHYA.items()):
        up, down = pair(out, COLS.get(name, H), 4, seed * 100 + i)
        if bfl:
            key = "diffusion_model." + path_bfl
            sd.update({f"{key}.lora_B.weight": 0.5 * up, f"{key}.lora_A.weight": down})
        else:
            key = "lora_unet_" + name
            sd.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)})
        deltas["lora_unet_" + name] = 0.5 * up.double() @ down.double()
    save_file(sd, str(path), metadata)
    return deltas


# diffusers module -> (kohya module, first row, rows)
DIFFUSERS = {"transformer_blocks.0.attn.to_q": ("double_blocks_0_img_attn_qkv", 0, H),
             "transformer_blocks.0.attn.to_v": ("double_blocks_0_img_attn_qkv", 2 * H, H),
             "transformer_blocks.0.attn.add_k_proj": ("double_blocks_0_txt_attn_qkv", H, H),
             "transformer_blocks.0.attn.to_out.0": ("double_blocks_0_img_attn_proj", 0, H),
             "single_transformer_blocks.0.attn.to_k": ("single_blocks_0_linear1", H, H),
             "single_transformer_blocks.0.proj_mlp": ("single_blocks_0_linear1", 3 * H, 4 * H),
             "single_transformer_blocks.0.proj_out": ("single_blocks_0_linear2", 0, H),
             "x_embedder": ("img_in", 0, H),
             "time_text_embed.guidance_embedder.linear_1": ("guidance_in_in_layer", 0, H)}
ROWS = {"double_blocks_0_img_attn_qkv": 3 * H, "double_blocks_0_txt_attn_qkv": 3 * H, "single_blocks_0_linear1": 7 * H,
        "single_blocks_0_linear2": H, "double_blocks_0_img_attn_proj": H, "img_in": H, "guidance_in_in_layer": H,
        "final_layer_adaLN_modulation_1": 2 * H}


def diffusers_file(path, prefix: str = "transformer.", sep: str = ".", seed: int = 2) -> dict[str, torch.Tensor]:
    """diffusers/PEFT-named Flux LoRA (rank 2, no alpha), or OneTrainer's names (prefix lora_transformer_,
    sep _, kohya suffixes, α 1 on to_q): the dense ΔW it puts on each kohya module, rows placed by hand —
    under its own name for the two modules whose kohya twin kohya_file lacks (they keep their names)."""
    deltas, sd = {}, {}
    peft = sep == "."
    for i, (name, (kohya, start, rows)) in enumerate({**DIFFUSERS, "norm_out.linear": (None, 0, 2 * H)}.items()):
        up, down = pair(rows, COLS.get(kohya, H), 2, seed * 100 + i)
        key = prefix + name.replace(".", sep)
        sd.update({f"{key}.lora_B.weight": up, f"{key}.lora_A.weight": down} if peft else
                  {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down})
        if not peft and name.endswith("to_q"):  # α 1 on rank 2 (its parts' scales then differ: 0.5 and 1)
            sd[f"{key}.alpha"] = torch.tensor(1.0)
            up = 0.5 * up
        if kohya is None:  # norm_out.linear: shift|scale where the BFL weight has scale|shift
            kohya, up = "final_layer_adaLN_modulation_1", torch.cat([up[H:], up[:H]])
        key = "lora_unet_" + kohya if kohya in KOHYA else prefix + name.replace(".", sep)
        dense = deltas.setdefault(key, torch.zeros(ROWS[kohya], COLS.get(kohya, H), dtype=F64))
        dense[start:start + rows] += up.double() @ down.double()
    save_file(sd, str(path))
    return deltas
