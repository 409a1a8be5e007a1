"""SD3 LoRAs named the kohya way (MMDiT paths, q|k|v fused) and the diffusers way (q, k, v apart) merge module by
module: the diffusers q, k, v LoRAs of a stream are row blocks of its fused qkv, norm_out.linear is the final
adaLN modulation with its halves swapped; bake reads the same places.  References are dense, from the raw tensors,
rows placed in sd3_synth."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.cli import main
from merge_core.errors import MergeCoreError
from merge_core.lora_file import load_lora, summary
from merge_core.merge import merge_loras, parse_block_weights

from merge_testlib import merged_two_ways, one_torch_thread  # noqa: F401
from sd3_synth import ADM, CTX, H, diffusers_file, kohya_file


def test_kohya_and_diffusers_sd3_loras_merge_module_by_module(tmp_path, caplog):
    result, _ = merged_two_ways(tmp_path, caplog, kohya_file, diffusers_file, full_rank=16)  # above every summed rank
    assert result.modules["lora_unet_joint_blocks_0_x_block_attn_qkv"].rank == 4 + 2 + 2  # kohya's, to_q's, to_v's
    assert result.modules["lora_unet_final_layer_adaLN_modulation_1"].rank == 4 + 2  # norm_out joined, swapped
    # no input has kohya's context_block.attn.proj or y_embedder: those diffusers modules keep their names
    assert {"transformer.transformer_blocks.0.attn.to_add_out", "transformer.time_text_embed.text_embedder.linear_1"
            } < set(result.modules)


def test_a_block_s_norm1_context_keeps_its_name(tmp_path):
    """ComfyUI swaps the halves of norm1_context.linear in the last block only (its text stream is pre-only),
    which the names cannot tell: such a module is carried under its own name, which ComfyUI reads."""
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(6 * H, 2, generator=g), torch.randn(2, H, generator=g)
    kohya_file(tmp_path / "k.safetensors")
    save_file({"transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight": up,
               "transformer.transformer_blocks.0.norm1_context.linear.lora_A.weight": down,
               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": up[:H].clone(),
               "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": down.clone()}, str(tmp_path / "d.safetensors"))
    result = merge_loras([load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "d.safetensors")], "concat")
    assert "transformer.transformer_blocks.0.norm1_context.linear" in result.modules
    assert "transformer.transformer_blocks.0.attn.to_k" not in result.modules  # joined into x_block.attn.qkv


def test_a_diffusers_sd3_lora_bakes_into_an_sd3_checkpoint(tmp_path):
    """Bake reads the same places: every module of a diffusers-named SD3 LoRA lands on its MMDiT weight of a
    single-file checkpoint (q, k, v in their rows of the fused qkv, norm_out swapped), exactly."""
    prefix = "model.diffusion_model."
    shapes = {"joint_blocks.0.x_block.attn.qkv": (3 * H, H), "joint_blocks.0.context_block.attn.qkv": (3 * H, H),
              "joint_blocks.0.x_block.attn2.qkv": (3 * H, H), "joint_blocks.0.context_block.attn.proj": (H, H),
              "joint_blocks.1.x_block.mlp.fc1": (4 * H, H), "final_layer.adaLN_modulation.1": (2 * H, H),
              "context_embedder": (H, CTX), "y_embedder.mlp.0": (H, ADM)}
    base = {f"{prefix}{path}.weight": torch.randn(*shape) for path, shape in shapes.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    deltas = diffusers_file(tmp_path / "d.safetensors")
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model",
                 str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "baked.safetensors")]) == 0
    baked = load_file(str(tmp_path / "baked.safetensors"))
    own_names = {"transformer.transformer_blocks.0.attn.to_add_out": "joint_blocks.0.context_block.attn.proj",
                 "transformer.time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0"}
    assert len(deltas) == len(shapes)
    for name, delta in deltas.items():
        path = own_names.get(name) or next(p for p in shapes if "lora_unet_" + p.replace(".", "_") == name)
        key = f"{prefix}{path}.weight"
        assert torch.allclose(baked[key].double() - base[key].double(), delta, atol=1e-5), key


def test_a_diffusers_sd3_lora_is_not_taken_for_flux(tmp_path):
    """SD3's diffusers names share transformer_blocks, ff_context and norm1_context with Flux's: inspect does not
    call such a file Flux-style, and Flux block weights refuse it."""
    g = torch.Generator().manual_seed(4)
    save_file({f"transformer.transformer_blocks.0.{path}.lora_{ab}.weight": torch.randn(*shape, generator=g)
               for path, rows in (("ff_context.net.2", H), ("norm1_context.linear", 6 * H), ("attn.to_q", H))
               for ab, shape in (("A", (2, H)), ("B", (rows, 2)))}, str(tmp_path / "d.safetensors"))
    sd3 = load_lora(tmp_path / "d.safetensors")
    assert summary(sd3)["flux_naming"] is None and summary(sd3)["blocks"] is None
    with pytest.raises(MergeCoreError, match="named block weights are Flux's; .* has no Flux double or single blocks"):
        merge_loras([sd3], block_weights=[parse_block_weights("D=0")])
