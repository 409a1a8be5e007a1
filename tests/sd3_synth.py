"""Synthetic SD3 LoRAs of a tiny MMDiT (2 joint blocks; ComfyUI makes it 64 wide per block, so H = 128) named the
kohya way (ComfyUI's MMDiT paths) and the diffusers way (q, k, v apart), each with the dense ΔW it puts on every
weight (rows placed by hand here, not by merge_core): under the kohya name, or under its own name for the
diffusers modules kohya_file has no twin of (they keep their names)."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from flux_synth import pair

H, ADM, CTX = 128, 8, 8  # hidden width; widths of the pooled text (y_embedder) and the text tokens (context_embedder)
# the tiny SD3 (block 0 with SD3.5 Medium's second image attention) as ComfyUI builds it from this config
CONFIG = dict(in_channels=16, patch_size=2, out_channels=16, depth=2, input_size=None, adm_in_channels=ADM,
              context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CTX, "out_features": H}},
              num_patches=16, pos_embed_max_size=4, pos_embed_scaling_factor=None, x_block_self_attn_layers=[0])
COLS = {"context_embedder": CTX, "y_embedder_mlp_0": ADM}  # the rest read H columns

# kohya module -> rows
KOHYA = {"joint_blocks_0_x_block_attn_qkv": 3 * H, "joint_blocks_0_context_block_attn_qkv": 3 * H,
         "joint_blocks_0_x_block_attn2_qkv": 3 * H, "joint_blocks_1_x_block_mlp_fc1": 4 * H,
         "final_layer_adaLN_modulation_1": 2 * H, "context_embedder": H}
# diffusers module -> (kohya module, first row, rows)
DIFFUSERS = {"transformer_blocks.0.attn.to_q": ("joint_blocks_0_x_block_attn_qkv", 0, H),
             "transformer_blocks.0.attn.to_v": ("joint_blocks_0_x_block_attn_qkv", 2 * H, H),
             "transformer_blocks.0.attn.add_k_proj": ("joint_blocks_0_context_block_attn_qkv", H, H),
             "transformer_blocks.0.attn2.to_q": ("joint_blocks_0_x_block_attn2_qkv", 0, H),
             "transformer_blocks.0.attn.to_add_out": ("joint_blocks_0_context_block_attn_proj", 0, H),
             "transformer_blocks.1.ff.net.0.proj": ("joint_blocks_1_x_block_mlp_fc1", 0, 4 * H),
             "context_embedder": ("context_embedder", 0, H),
             "time_text_embed.text_embedder.linear_1": ("y_embedder_mlp_0", 0, H)}


def kohya_file(path, seed: int = 1) -> dict[str, torch.Tensor]:
    """kohya SD3 LoRA, rank 4, α 2: the dense ΔW per kohya module."""
    deltas, sd = {}, {}
    for i, (name, rows) in enumerate(KOHYA.items()):
        up, down = pair(rows, COLS.get(name, H), 4, seed * 100 + i)
        key = "lora_unet_" + name
        sd.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)})
        deltas[key] = 0.5 * up.double() @ down.double()
    save_file(sd, str(path))
    return deltas


def diffusers_file(path, prefix: str = "transformer.", seed: int = 2) -> dict[str, torch.Tensor]:
    """diffusers/PEFT-named SD3 LoRA, rank 2, no α (scale 1), with norm_out.linear (shift|scale where the MMDiT's
    final adaLN has scale|shift): the dense ΔW per weight, each part in its rows."""
    deltas, sd = {}, {}
    for i, (name, (kohya, first, rows)) in enumerate({**DIFFUSERS, "norm_out.linear": (None, 0, 2 * H)}.items()):
        up, down = pair(rows, COLS.get(kohya, H), 2, seed * 100 + i)
        sd.update({f"{prefix}{name}.lora_B.weight": up, f"{prefix}{name}.lora_A.weight": down})
        if kohya is None:
            kohya, up = "final_layer_adaLN_modulation_1", torch.cat([up[H:], up[:H]])
        key = "lora_unet_" + kohya if kohya in KOHYA else prefix + name
        dense = deltas.setdefault(key, torch.zeros(KOHYA.get(kohya, rows), COLS.get(kohya, H), dtype=torch.float64))
        dense[first:first + rows] += up.double() @ down.double()
    save_file(sd, str(path))
    return deltas
