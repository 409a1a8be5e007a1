"""SD3 / SD3.5's namings of one MMDiT, as ComfyUI maps them onto the model's weights (comfy/utils.mmdit_to_diffusers,
read to learn the mapping):

- kohya / ComfyUI's own (`lora_unet_joint_blocks_0_x_block_attn_qkv`, `diffusion_model.joint_blocks.0.…`): q|k|v
  fused in one weight per stream (x_block: the image, context_block: the text);
- diffusers (AI-Toolkit, SimpleTuner, OneTrainer, PEFT: `transformer.transformer_blocks.0.attn.to_q`): q, k and v
  apart, each `hidden` rows of the fused weight; `add_q_proj`… the text stream's, `attn2` SD3.5 Medium's second
  image attention.

Left out: a block's `norm1_context.linear`, whose two row halves ComfyUI swaps in the last block only (its text
stream is pre-only), which a LoRA's names cannot tell; such a module keeps its name, which ComfyUI reads.
"""
from __future__ import annotations

from typing import Optional

from .diffusers_tables import PATH_PREFIXES, DiffusersTable, Place

# diffusers path inside a joint block -> (MMDiT path, row block of the fused q|k|v weight or None)
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2}
_JOINT = {**{f"attn.{d}": ("x_block.attn.qkv", i) for d, i in _QKV.items()},
          **{f"attn.add_{d[3:]}_proj": ("context_block.attn.qkv", i) for d, i in _QKV.items()},
          **{f"attn2.{d}": ("x_block.attn2.qkv", i) for d, i in _QKV.items()},
          "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
          "attn2.to_out.0": ("x_block.attn2.proj", None), "norm1.linear": ("x_block.adaLN_modulation.1", None),
          "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
          "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None)}
_GLOBAL = {"context_embedder": "context_embedder", "proj_out": "final_layer.linear",
           "norm_out.linear": "final_layer.adaLN_modulation.1",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
SD3 = DiffusersTable(PATH_PREFIXES, {"transformer_blocks": ("joint_blocks", _JOINT)}, _GLOBAL,
                     swapped=["final_layer.adaLN_modulation.1"])


def sd3_place(name: str) -> Optional[Place]:
    """The kohya place of a module with an SD3 diffusers name: its MMDiT module, or a row block of a fused q|k|v
    (None: not such a name)."""
    return SD3.place(name)
