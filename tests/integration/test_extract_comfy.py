"""Extracted SDXL LoRAs in the real ComfyUI 0.3.75: every one of the 986 LoRA-table layers (real shapes, original
checkpoint layout, TE2 as OpenCLIP in_proj) plus norms, biases, conv_in, embeddings, text_projection loads with
zero "lora key not loaded", and ComfyUI applies the TE2 q/k/v blocks as the dense deltas.  Also checks
merge_core's SDXL checkpoint layout (used by the benchmark) against ComfyUI's own SDXL model."""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from comfy_host import load_lora_with_comfy, sdxl_model_and_clip_meta  # noqa: E402

from merge_core.checkpoint.layout import placements  # noqa: E402
from merge_core.checkpoint.sdxl_checkpoint import sdxl_checkpoint_shapes  # noqa: E402
from merge_core.extract import DictSource, extract_to_file  # noqa: E402
from merge_core.keys.sdxl_table import sdxl_modules  # noqa: E402
from merge_core.lowrank import RankRule  # noqa: E402

pytestmark = pytest.mark.comfyui

UNET, TE1, TE2 = "model.diffusion_model.", "conditioner.embedders.0.transformer.text_model.", \
    "conditioner.embedders.1.model."
OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
EXTRAS = [UNET + "input_blocks.0.0.weight", UNET + "input_blocks.0.0.bias", UNET + "time_embed.0.weight",
          UNET + "label_emb.0.0.weight", UNET + "input_blocks.4.1.norm.weight", UNET + "input_blocks.4.1.norm.bias",
          UNET + "input_blocks.4.1.transformer_blocks.0.norm1.weight", UNET + "input_blocks.4.1.proj_in.bias",
          UNET + "out.2.weight", UNET + "input_blocks.1.0.in_layers.2.weight",
          UNET + "input_blocks.4.0.skip_connection.weight",
          TE1 + "final_layer_norm.weight", TE1 + "embeddings.position_embedding.weight",
          TE1 + "encoder.layers.0.self_attn.q_proj.bias", TE2 + "transformer.resblocks.0.attn.in_proj_bias",
          TE2 + "ln_final.weight", TE2 + "positional_embedding", TE2 + "text_projection",
          TE2 + "transformer.resblocks.0.ln_1.weight", TE2 + "transformer.resblocks.0.mlp.c_fc.bias",
          TE2 + "logit_scale"]
RANK = 2


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Every LoRA-table layer in the original SDXL checkpoint layout, plus EXTRAS."""
    out = {}
    for spec in sdxl_modules().values():
        if spec.locon:
            continue
        if spec.group == "unet":
            out[UNET + spec.key[len("diffusion_model."):]] = spec.shape
        elif spec.group == "te1":
            out[TE1 + spec.key[len("clip_l.transformer.text_model."):]] = spec.shape
        else:
            layer, part = spec.key.split(".encoder.layers.")[1].split(".", 1)
            part = part[: -len(".weight")]
            if part in OPENCLIP:
                out[f"{TE2}transformer.resblocks.{layer}.{OPENCLIP[part]}.weight"] = spec.shape
            else:
                out[f"{TE2}transformer.resblocks.{layer}.attn.in_proj_weight"] = (3 * spec.shape[0], spec.shape[1])
    full = sdxl_checkpoint_shapes()
    out.update({k: full[k][0] for k in EXTRAS})
    return out


def low_rank_delta(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if len(shape) < 2:
        return 0.01 * torch.randn(shape, generator=gen)
    n = torch.Size(shape[1:]).numel()
    return (0.1 * torch.randn(shape[0], RANK, generator=gen) @ torch.randn(RANK, n, generator=gen)).reshape(shape)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    shapes = checkpoint_shapes()
    zeros = {s: torch.zeros(s) for s in set(shapes.values())}  # shared: the extractor never writes to its inputs
    base = DictSource({k: zeros[s] for k, s in shapes.items()}, shapes)
    tuned = DictSource({k: (lambda k=k, s=s: low_rank_delta(k, s)) for k, s in shapes.items()}, shapes)
    out = tmp_path_factory.mktemp("comfy") / "sdxl_extracted.safetensors"
    report = extract_to_file(base, tuned, out, "fp32", rule=RankRule(rank=8), device="cpu")
    from safetensors.torch import load_file

    assert all(not z.any() for z in zeros.values())
    return shapes, load_file(str(out)), report


@pytest.mark.usefixtures("comfy_inprocess")
def test_sdxl_checkpoint_layout_matches_comfyui():
    model, clip = sdxl_model_and_clip_meta()
    mine = sdxl_checkpoint_shapes()
    unet = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
    assert unet == {"diffusion_model." + k[len(UNET):]: s for k, (s, _) in mine.items() if k.startswith(UNET)}
    comfy_clip = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    placed = {}
    for key, (shape, _) in mine.items():
        if not key.startswith(UNET):
            for p in placements(key, shape) or []:
                placed[p.comfy_key] = tuple(p.take(torch.empty(shape, device="meta")).shape)
    missing = set(comfy_clip) - set(placed)  # parameters SDXL checkpoints do not store
    assert missing == {"clip_l.logit_scale", "clip_g.logit_scale", "clip_l.transformer.text_projection.weight"}
    assert all(comfy_clip[k] == s for k, s in placed.items() if k in comfy_clip)
    assert set(placed) - set(comfy_clip) == {"clip_l.transformer.text_model.embeddings.position_ids"}


@pytest.mark.usefixtures("comfy_inprocess")
def test_every_table_module_loads_in_comfyui_with_no_missing_keys(extracted):
    shapes, sd, report = extracted
    names = {k.rsplit(".", 2)[0] if k.endswith((".lora_up.weight", ".lora_down.weight")) else k.rsplit(".", 1)[0]
             for k in sd}
    table = {n for n, spec in sdxl_modules().items() if not spec.locon}
    assert len(table) == 986 and table <= names
    patches, not_loaded = load_lora_with_comfy(sd)
    assert not_loaded == []
    expected = {p.comfy_key for key, shape in shapes.items() for p in placements(key, shape)}
    assert set(patches) == expected  # one patch per weight, bias and q/k/v block
    assert report.extra["skipped"] == {"scalar": 1}


@pytest.mark.usefixtures("comfy_inprocess")
def test_comfyui_applies_te2_qkv_blocks_as_the_dense_delta(extracted):
    import comfy.lora

    shapes, sd, _ = extracted
    patches, _ = load_lora_with_comfy(sd)
    key = f"{TE2}transformer.resblocks.5.attn.in_proj_weight"
    full = low_rank_delta(key, shapes[key])  # base is zero
    for i, p in enumerate(("q", "k", "v")):
        target = f"clip_g.transformer.text_model.encoder.layers.5.self_attn.{p}_proj.weight"
        got = comfy.lora.calculate_weight([(0.5, patches[target], 1.0, None, None)], torch.zeros(1280, 1280), target)
        torch.testing.assert_close(got, 0.5 * full[1280 * i:1280 * (i + 1)], rtol=1e-4, atol=1e-5)
    proj = f"{TE2}text_projection"
    got = comfy.lora.calculate_weight([(1.0, patches["clip_g.transformer.text_projection.weight"], 1.0, None, None)],
                                      torch.zeros(1280, 1280), "clip_g.transformer.text_projection.weight")
    torch.testing.assert_close(got, low_rank_delta(proj, shapes[proj]).T, rtol=1e-4, atol=1e-5)
