"""Z-Image LoRAs named ComfyUI's way (kohya, or `diffusion_model.` with the fused attention.qkv) and the diffusers
way (AI-Toolkit's `diffusion_model.…attention.to_q`, SimpleTuner's `lycoris_…`) merge module by module: to_q,
to_k and to_v are row blocks of the fused qkv.  References are dense, from the raw tensors, rows placed by hand
in zimage_synth."""
from __future__ import annotations

import pytest
import torch

from merge_core.lora_file import load_lora, summary, summary_lines
from merge_core.merge import merge_loras

from merge_testlib import one_torch_thread  # noqa: F401
from flux_synth import pair
from zimage_synth import D, comfy_file, diffusers_file
from safetensors.torch import save_file

JOINED = ("lora_unet_layers_0_attention_qkv", "lora_unet_layers_0_attention_out", "lora_unet_final_layer_linear",
          "lora_unet_x_embedder")


def merged(tmp_path, first, second, weights=(1.0, -0.5)):
    sets = [load_lora(tmp_path / f"{tag}.safetensors") for tag in (first, second)]
    return merge_loras(sets, "concat", weights=list(weights))


def test_ai_toolkit_and_comfyui_extracted_zimage_loras_merge_module_by_module(tmp_path, caplog):
    """Both name their modules `diffusion_model.…`: AI-Toolkit's to_q and to_v join the other's qkv (to_k's
    rows zero), to_out.0 and all_final_layer.2-1/all_x_embedder.2-1 meet their ComfyUI modules under kohya
    names; paths both spell alike stay as they are; a part whose fused module no input holds keeps its name."""
    comfy, diffusers = comfy_file(tmp_path / "c.safetensors"), diffusers_file(tmp_path / "d.safetensors")
    with caplog.at_level("WARNING"):
        result = merged(tmp_path, "c", "d")
    assert caplog.records == []
    assert set(result.modules) == {*JOINED, "diffusion_model.layers.0.feed_forward.w1",
                                   "diffusion_model.noise_refiner.0.attention.qkv",
                                   "diffusion_model.context_refiner.0.attention.to_k"}
    for name in JOINED:
        want = comfy[name] - 0.5 * diffusers[name]
        assert torch.allclose(result.modules[name].delta().double(), want, atol=1e-5), name
    w1 = "lora_unet_layers_0_feed_forward_w1"
    want = comfy[w1] - 0.5 * diffusers[w1]
    assert torch.allclose(result.modules["diffusion_model.layers.0.feed_forward.w1"].delta().double(), want,
                          atol=1e-5)
    to_k = diffusers["lora_unet_context_refiner_0_attention_qkv"][D:2 * D]
    assert torch.allclose(result.modules["diffusion_model.context_refiner.0.attention.to_k"].delta().double(),
                          -0.5 * to_k, atol=1e-5)
    assert result.modules["lora_unet_layers_0_attention_qkv"].rank == 4 + 2 + 2  # the extract's 4, to_q's and to_v's 2


def test_ai_toolkit_and_kohya_named_zimage_loras_merge_under_kohya_names(tmp_path):
    comfy, diffusers = comfy_file(tmp_path / "k.safetensors", bfl=False), diffusers_file(tmp_path / "d.safetensors")
    result = merged(tmp_path, "k", "d", (0.5, 2.0))
    assert set(result.modules) == {*comfy, "diffusion_model.context_refiner.0.attention.to_k"}
    for name, delta in comfy.items():
        want = 0.5 * delta + 2.0 * diffusers.get(name, torch.zeros_like(delta))
        assert torch.allclose(result.modules[name].delta().double(), want, atol=1e-5), name


def test_two_diffusers_named_zimage_loras_alone_keep_their_attention_parts(tmp_path):
    """AI-Toolkit's and SimpleTuner's names, no input holding the fused qkv: the parts stay as they are (each
    loads in ComfyUI), never renamed to a kohya to_q no loader maps; the paths that are the model's own
    (feed_forward.w1) still meet."""
    diffusers_file(tmp_path / "d.safetensors")
    diffusers_file(tmp_path / "l.safetensors", prefix="lycoris_", sep="_", seed=5)
    result = merged(tmp_path, "d", "l")
    names = set(result.modules)
    assert "lora_unet_layers_0_feed_forward_w1" in names
    assert {"diffusion_model.layers.0.attention.to_q", "lycoris_layers_0_attention_to_q"} <= names
    assert not any(n.startswith("lora_unet_") and "attention_to_" in n for n in names)
    assert len(names) == 2 * 7 - 1


def test_inspect_names_zimage_style_blocks_and_how_they_are_named(tmp_path):
    """inspect (and the Load LoRA node) say which of Z-Image's namings a file uses: kohya's or ComfyUI's fused
    q|k|v, or diffusers' q, k and v apart (AI-Toolkit, SimpleTuner)."""
    comfy_file(tmp_path / "c.safetensors")
    comfy_file(tmp_path / "k.safetensors", bfl=False)
    diffusers_file(tmp_path / "d.safetensors")
    diffusers_file(tmp_path / "l.safetensors", prefix="lycoris_", sep="_")
    infos = {tag: summary(load_lora(tmp_path / f"{tag}.safetensors")) for tag in "ckdl"}
    assert {tag: info["zimage_naming"] for tag, info in infos.items()} == {
        "c": "comfyui", "k": "kohya", "d": "diffusers", "l": "diffusers"}
    assert dict(summary_lines(infos["d"]))["format"].endswith(
        "(Z-Image/Lumina 2-style blocks, diffusers module names with q/k/v split)")
    assert dict(summary_lines(infos["k"]))["format"] == (
        "kohya names, architecture other (Z-Image/Lumina 2-style blocks, q|k|v fused)")


@pytest.mark.parametrize("parts", [("to_q", "to_k", "to_v"), ("to_v",)])
def test_lumina2_grouped_query_parts_join_the_fused_qkv_at_their_own_heights(tmp_path, parts):
    """Lumina 2's attention has fewer k/v heads than q heads: its fused qkv is D + 2·KV rows, to_k and to_v KV
    each.  A diffusers LoRA's parts land at rows [0, D), [D, D+KV), [D+KV, D+2KV) of the kohya module another
    input holds — sized by that module when to_k is missing."""
    KV = D // 4
    up, down = pair(D + 2 * KV, D, 4, 1)
    save_file({"lora_unet_layers_0_attention_qkv.lora_up.weight": up,
               "lora_unet_layers_0_attention_qkv.lora_down.weight": down}, str(tmp_path / "k.safetensors"))
    rows = {"to_q": (0, D), "to_k": (D, KV), "to_v": (D + KV, KV)}
    sd, want = {}, up.double() @ down.double()
    for i, part in enumerate(parts):
        b, a = pair(rows[part][1], D, 2, 10 + i)
        sd.update({f"diffusion_model.layers.0.attention.{part}.lora_B.weight": b,
                   f"diffusion_model.layers.0.attention.{part}.lora_A.weight": a})
        want[rows[part][0]:sum(rows[part])] += b.double() @ a.double()
    save_file(sd, str(tmp_path / "d.safetensors"))
    result = merged(tmp_path, "k", "d", (1.0, 1.0))
    assert set(result.modules) == {"lora_unet_layers_0_attention_qkv"}
    assert torch.allclose(result.modules["lora_unet_layers_0_attention_qkv"].delta().double(), want, atol=1e-5)
