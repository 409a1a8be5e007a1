"""A diffusion transformer saved on its own with BFL's names (Flux as Black Forest Labs ships it:
`double_blocks.0.img_attn.qkv.weight`, no prefix) is placed where ComfyUI holds it, under `diffusion_model.`:
extract names its modules `lora_unet_…` (what ComfyUI's LoRA loader maps), and bake finds a kohya Flux
LoRA's layers in it — and a diffusers-named one's, in the fused weights' rows.  An extract then a bake gives
the tuned file back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_core.cli import main
from merge_core.lora_file import load_lora

from flux_synth import COLS, H, diffusers_file, kohya_file
import zimage_synth

# key -> shape: a tiny Flux with BFL's names (hidden 32)
KEYS = {"img_in.weight": (32, 4), "img_in.bias": (32,), "double_blocks.0.img_attn.qkv.weight": (96, 32),
        "double_blocks.0.img_attn.qkv.bias": (96,), "double_blocks.0.img_attn.norm.key_norm.scale": (16,),
        "single_blocks.0.linear1.weight": (224, 32), "final_layer.linear.weight": (4, 32)}


def pair(tmp_path, keys: dict = KEYS, seed: int = 0) -> tuple[dict, dict]:
    """A random base of `keys` (key -> shape) and a tuned copy, saved as base/tuned.safetensors: low-rank weight
    changes (extracted exactly at rank 4), small vector ones."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(*s, generator=g) for k, s in keys.items()}
    tuned = {k: v + 0.1 * (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
                           if v.dim() == 2 else torch.randn(v.shape, generator=g)) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return base, tuned


def extracted(tmp_path, *options: str) -> Path:
    """The CLI's rank-4 fp32 LoRA extracted from pair()'s files."""
    lora = tmp_path / "lora.safetensors"
    assert main(["extract", "--source-model", str(tmp_path / "base.safetensors"), "--target-model",
                 str(tmp_path / "tuned.safetensors"), "--rank", "4", "--output-dtype", "fp32", "-o", str(lora),
                 *options]) == 0
    return lora


def bake_one(tmp_path, base: dict, name: str, rows: int, cols: int, seed: int,
             suffixes: tuple[str, str] = ("lora_B", "lora_A")) -> tuple[torch.Tensor, dict]:
    """Bake a random rank-2 LoRA module `name` (rows × cols, scale 1; PEFT's suffixes unless told) into the
    state dict `base`, both saved as files: (its ΔW, the baked state dict)."""
    save_file(base, str(tmp_path / "base.safetensors"))
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(rows, 2, generator=g), torch.randn(2, cols, generator=g)
    save_file({f"{name}.{suffixes[0]}.weight": up, f"{name}.{suffixes[1]}.weight": down},
              str(tmp_path / "d.safetensors"))
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model",
                 str(tmp_path / "d.safetensors"), "--output-dtype", "fp32", "-o", str(tmp_path / "b.safetensors")]) == 0
    return up @ down, load_file(str(tmp_path / "b.safetensors"))


def baked_file(base: Path, lora: Path) -> dict:
    """The CLI's fp32 bake of `lora` into `base`, read back."""
    out = base.with_name(base.stem + "_baked.safetensors")
    assert main(["bake", "--source-model", str(base), "--lora-model", str(lora), "--output-dtype", "fp32",
                 "-o", str(out)]) == 0
    return load_file(str(out))


def test_extract_names_a_bare_flux_transformer_as_comfyui_maps_it_and_bake_reverses_it(tmp_path):
    _, tuned = pair(tmp_path)
    lora, baked = extracted(tmp_path), tmp_path / "baked.safetensors"
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


def test_a_diffusers_flux_lora_bakes_into_the_fused_weights_of_a_bfl_model(tmp_path):
    """AI-Toolkit-style names (to_q, to_k, proj_mlp, norm_out, …) find their rows of the BFL model's fused
    weights, as ComfyUI applies them; a base of zeros gives back each weight's ΔW."""
    shapes = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.txt_attn.qkv": (3 * H, H),
              "double_blocks.0.img_attn.proj": (H, H), "single_blocks.0.linear1": (7 * H, H),
              "single_blocks.0.linear2": (H, 5 * H), "img_in": (H, 4), "guidance_in.in_layer": (H, 256),
              "final_layer.adaLN_modulation.1": (2 * H, H)}
    save_file({f"{k}.weight": torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "base.safetensors"))
    deltas = diffusers_file(tmp_path / "d.safetensors")
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model",
                 str(tmp_path / "d.safetensors"), "--output-dtype", "fp32", "-o", str(tmp_path / "b.safetensors")]) == 0
    got = load_file(str(tmp_path / "b.safetensors"))
    own = {"transformer.transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj",
           "transformer.time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer"}
    for name, delta in deltas.items():
        key = own.get(name) or next(k for k in shapes if "lora_unet_" + k.replace(".", "_") == name)
        assert torch.allclose(got[key + ".weight"].double(), delta, atol=1e-5), name


def test_a_diffusers_lora_bakes_into_a_diffusers_format_transformer(tmp_path):
    """FluxTransformer2DModel's own keys (transformer_blocks.0.attn.to_q.weight) take the LoRA's
    transformer.transformer_blocks.0.attn.to_q as they are."""
    delta, got = bake_one(tmp_path, {"transformer_blocks.0.attn.to_q.weight": torch.zeros(H, H)},
                          "transformer.transformer_blocks.0.attn.to_q", H, H, 1)
    assert torch.allclose(got["transformer_blocks.0.attn.to_q.weight"], delta, atol=1e-6)


def test_an_ai_toolkit_zimage_lora_bakes_into_the_fused_qkv_of_a_comfyui_named_zimage(tmp_path):
    """Z-Image as Comfy-Org ships it (bare, ComfyUI's names, q|k|v fused) is placed under `diffusion_model.`, and
    AI-Toolkit's `diffusion_model.layers.0.attention.to_q`/`to_v` find their rows of the fused qkv (to_out.0,
    all_final_layer.2-1, all_x_embedder.2-1 their ComfyUI weights); a base of zeros gives back each ΔW."""
    D = zimage_synth.D
    shapes = {path: (rows, D) for path, rows in zimage_synth.COMFY.values()}
    shapes["context_refiner.0.attention.qkv"] = (3 * D, D)
    save_file({f"{k}.weight": torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "base.safetensors"))
    deltas = zimage_synth.diffusers_file(tmp_path / "d.safetensors")
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model",
                 str(tmp_path / "d.safetensors"), "--output-dtype", "fp32", "-o", str(tmp_path / "b.safetensors")]) == 0
    got = load_file(str(tmp_path / "b.safetensors"))
    for name, delta in deltas.items():
        key = next(k for k in shapes if "lora_unet_" + k.replace(".", "_") == name)
        assert torch.allclose(got[key + ".weight"].double(), delta, atol=1e-5), name


def test_extract_names_a_diffusers_format_zimage_as_comfyui_maps_it_and_bake_reverses_it(tmp_path):
    """Tongyi's diffusers-format Z-Image transformer (q, k, v apart; norm_q, to_out.0, all_x_embedder.2-1): the
    paths ComfyUI's fused model spells otherwise keep `diffusion_model.<path>` (ComfyUI maps each onto its part
    of the weight; `lora_unet_layers_0_attention_to_q` it would not load), the others get kohya names; the bake
    takes both back, and the kohya spelling an earlier extract wrote."""
    D = zimage_synth.D
    keys = {"layers.0.attention.to_q.weight": (D, D), "layers.0.attention.to_k.weight": (D, D),
            "layers.0.attention.norm_q.weight": (D // 2,), "layers.0.attention.to_out.0.weight": (D, D),
            "layers.0.feed_forward.w1.weight": (3 * D, D), "noise_refiner.0.attention.to_v.weight": (D, D),
            "all_x_embedder.2-1.weight": (D, 16), "all_x_embedder.2-1.bias": (D,)}
    base, tuned = pair(tmp_path, keys, 3)
    lora, baked = extracted(tmp_path), tmp_path / "baked.safetensors"
    assert set(load_lora(lora).modules) == {
        "diffusion_model.layers.0.attention.to_q", "diffusion_model.layers.0.attention.to_k",
        "diffusion_model.layers.0.attention.norm_q", "diffusion_model.layers.0.attention.to_out.0",
        "lora_unet_layers_0_feed_forward_w1", "diffusion_model.noise_refiner.0.attention.to_v",
        "diffusion_model.all_x_embedder.2-1"}
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model", str(lora),
                 "--output-dtype", "fp32", "-o", str(baked)]) == 0
    got = load_file(str(baked))
    for k, v in tuned.items():
        assert torch.allclose(got[k], v, atol=1e-5), k

    delta, got = bake_one(tmp_path, base, "lora_unet_layers_0_attention_to_q", D, D, 5,  # the kohya spelling
                          ("lora_up", "lora_down"))
    assert torch.allclose(got["layers.0.attention.to_q.weight"], base["layers.0.attention.to_q.weight"] + delta,
                          atol=1e-5)


def test_a_diffusers_lumina2_lora_bakes_into_the_grouped_query_qkv_rows(tmp_path):
    """Lumina 2's fused qkv is D + 2·KV rows (fewer k/v heads): AI-Toolkit's to_k lands at rows [D, D+KV)."""
    D, KV = zimage_synth.D, zimage_synth.D // 4
    base = {"layers.0.attention.qkv.weight": torch.zeros(D + 2 * KV, D),
            "noise_refiner.0.ffn_norm1.weight": torch.zeros(D)}
    delta, got = bake_one(tmp_path, base, "diffusion_model.layers.0.attention.to_k", KV, D, 4)
    want = torch.zeros(D + 2 * KV, D)
    want[D:D + KV] = delta
    assert torch.allclose(got["layers.0.attention.qkv.weight"], want, atol=1e-6)


def test_extract_names_a_diffusers_format_flux_as_comfyui_maps_it(tmp_path):
    """FluxTransformer2DModel's keys (as ComfyUI's loader reads a diffusers-format Flux): every module is named
    `transformer.<path>`, which ComfyUI maps onto its fused BFL weights; q's bias, which ComfyUI's key map cannot
    place, is left out (reported), and the bake of the result gives back every other tuned tensor."""
    keys = {"x_embedder.weight": (H, 4), "x_embedder.bias": (H,), "transformer_blocks.0.attn.to_q.weight": (H, H),
            "transformer_blocks.0.attn.to_q.bias": (H,), "transformer_blocks.0.attn.norm_q.weight": (H // 2,),
            "single_transformer_blocks.0.proj_mlp.weight": (4 * H, H), "norm_out.linear.weight": (2 * H, H)}
    base, tuned = pair(tmp_path, keys, 5)
    report = tmp_path / "report.json"
    lora = extracted(tmp_path, "--report", str(report))
    assert set(load_lora(lora).modules) == {"transformer." + k.rsplit(".", 1)[0] for k in keys}
    assert json.loads(report.read_text())["skipped_keys"] == {
        "no_comfyui_name": ["transformer_blocks.0.attn.to_q.bias"]}
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model", str(lora),
                 "--output-dtype", "fp32", "-o", str(tmp_path / "baked.safetensors")]) == 0
    got = load_file(str(tmp_path / "baked.safetensors"))
    for k, v in tuned.items():
        want = base[k] if k == "transformer_blocks.0.attn.to_q.bias" else v
        assert torch.allclose(got[k], want, atol=1e-5), k

    bias = torch.randn(H, generator=torch.Generator().manual_seed(6))  # a bake still takes q's bias, held alone
    save_file({"transformer.transformer_blocks.0.attn.to_q.diff_b": bias}, str(tmp_path / "b.safetensors"))
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model",
                 str(tmp_path / "b.safetensors"), "--output-dtype", "fp32", "-o",
                 str(tmp_path / "b2.safetensors")]) == 0
    assert torch.allclose(load_file(str(tmp_path / "b2.safetensors"))["transformer_blocks.0.attn.to_q.bias"],
                          base["transformer_blocks.0.attn.to_q.bias"] + bias, atol=1e-6)


# a diffusers-format Flux (FluxTransformer2DModel's keys) of the tiny model: each weight's rows of a kohya module's
# ΔW, by hand (norm_out.linear: the final adaLN's two halves the other way round, "swap")
DIFFUSERS_ROWS = {"transformer_blocks.0.attn.to_q": ("double_blocks_0_img_attn_qkv", 0, H),
                  "transformer_blocks.0.attn.to_k": ("double_blocks_0_img_attn_qkv", H, 2 * H),
                  "transformer_blocks.0.attn.to_v": ("double_blocks_0_img_attn_qkv", 2 * H, 3 * H),
                  "transformer_blocks.0.attn.add_q_proj": ("double_blocks_0_txt_attn_qkv", 0, H),
                  "transformer_blocks.0.attn.add_k_proj": ("double_blocks_0_txt_attn_qkv", H, 2 * H),
                  "transformer_blocks.0.attn.add_v_proj": ("double_blocks_0_txt_attn_qkv", 2 * H, 3 * H),
                  "single_transformer_blocks.0.attn.to_q": ("single_blocks_0_linear1", 0, H),
                  "single_transformer_blocks.0.attn.to_k": ("single_blocks_0_linear1", H, 2 * H),
                  "single_transformer_blocks.0.attn.to_v": ("single_blocks_0_linear1", 2 * H, 3 * H),
                  "single_transformer_blocks.0.proj_mlp": ("single_blocks_0_linear1", 3 * H, 7 * H),
                  "single_transformer_blocks.0.proj_out": ("single_blocks_0_linear2", 0, H),
                  "norm_out.linear": ("final_layer_adaLN_modulation_1", "swap", None),
                  "x_embedder": ("img_in", 0, H)}


def diffusers_rows(deltas: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    kohya, start, stop = DIFFUSERS_ROWS[path]
    d = deltas["lora_unet_" + kohya]
    return torch.cat([d[H:], d[:H]]) if start == "swap" else d[start:stop]


@pytest.mark.parametrize("bfl", [False, True], ids=["kohya", "bfl"])
def test_a_kohya_flux_lora_bakes_into_the_parts_of_a_diffusers_format_flux(tmp_path, bfl):
    """A kohya (or BFL-named) Flux LoRA's fused modules patch a diffusers-format Flux's q, k, v (and proj_mlp)
    with their row blocks of ΔW, norm_out.linear with the halves swapped, as ComfyUI applies it to the model it
    converts that transformer into; a base of zeros gives back each part.  A fused bias (.diff_b) is cut the same
    way."""
    shapes = {path: (stop - start, COLS.get(kohya, H)) if start != "swap" else (2 * H, H)
              for path, (kohya, start, stop) in DIFFUSERS_ROWS.items()}
    base = {f"{path}.weight": torch.zeros(s) for path, s in shapes.items()}
    base.update({f"transformer_blocks.0.attn.{p}.bias": torch.zeros(H) for p in ("to_q", "to_k", "to_v")})
    save_file(base, str(tmp_path / "base.safetensors"))
    deltas = kohya_file(tmp_path / "k.safetensors", bfl=bfl)
    bias = torch.randn(3 * H, generator=torch.Generator().manual_seed(7))
    with safe_open(tmp_path / "k.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv" if bfl else "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({**sd, f"{qkv}.diff_b": bias}, str(tmp_path / "k.safetensors"))
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model",
                 str(tmp_path / "k.safetensors"), "--output-dtype", "fp32", "--report", str(tmp_path / "r.json"),
                 "-o", str(tmp_path / "b.safetensors")]) == 0
    got = load_file(str(tmp_path / "b.safetensors"))
    assert json.loads((tmp_path / "r.json").read_text())["skipped"] == []
    for path in DIFFUSERS_ROWS:
        assert torch.allclose(got[f"{path}.weight"].double(), diffusers_rows(deltas, path), atol=1e-5), path
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        assert torch.equal(got[f"transformer_blocks.0.attn.{p}.bias"], bias[i * H:(i + 1) * H]), p


def test_a_dora_on_a_fused_flux_weight_is_not_baked_into_its_parts(tmp_path):
    """DoRA's column norm is over the whole fused qkv: with the base holding q, k and v apart it is left out,
    saying why; the plain modules beside it bake."""
    shapes = {path: (stop - start, H) for path, (kohya, start, stop) in DIFFUSERS_ROWS.items()
              if kohya == "double_blocks_0_img_attn_qkv"}
    base = {f"{path}.weight": torch.zeros(s) for path, s in shapes.items()}
    base["x_embedder.weight"] = torch.zeros(H, 4)  # it and a single block tell a diffusers-format Flux
    base["single_transformer_blocks.0.proj_out.weight"] = torch.zeros(H, 5 * H)
    save_file(base, str(tmp_path / "base.safetensors"))
    g = torch.Generator().manual_seed(3)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * H, 2, generator=g),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, H, generator=g),
            "lora_unet_double_blocks_0_img_attn_qkv.dora_scale": torch.rand(1, H, generator=g) + 0.5,
            "lora_unet_img_in.lora_up.weight": torch.randn(H, 2, generator=g),
            "lora_unet_img_in.lora_down.weight": torch.randn(2, 4, generator=g)}
    save_file(lora, str(tmp_path / "d.safetensors"))
    assert main(["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model",
                 str(tmp_path / "d.safetensors"), "--output-dtype", "fp32", "--report", str(tmp_path / "r.json"),
                 "-o", str(tmp_path / "b.safetensors")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["matched"] == ["lora_unet_img_in"]
    assert report["skipped"] == [{"module": "lora_unet_double_blocks_0_img_attn_qkv", "role": "weight", "reason":
                                  "DoRA's norm is over the whole fused weight; the base holds it in parts "
                                  "('transformer_blocks.0.attn.to_q.weight', …), so the magnitude cannot be applied "
                                  "part by part"}]
    got = load_file(str(tmp_path / "b.safetensors"))
    img_in = lora["lora_unet_img_in.lora_up.weight"] @ lora["lora_unet_img_in.lora_down.weight"]
    assert torch.allclose(got["x_embedder.weight"], img_in, atol=1e-6)
    assert not got["transformer_blocks.0.attn.to_q.weight"].any()


def test_the_split_biases_of_a_diffusers_format_flux_are_extracted_fused_and_bake_back(tmp_path):
    """q, k and v's biases (no name places one alone in ComfyUI) are written stacked as the fused weight's
    `.diff_b`, norm_out's with its halves swapped as the final adaLN's; a bake into the same diffusers-format base
    cuts them apart again, giving every tuned tensor back."""
    qkv = ("to_q", "to_k", "to_v")
    keys = {"x_embedder.weight": (H, 4), "single_transformer_blocks.0.proj_out.weight": (H, 5 * H),
            "norm_out.linear.weight": (2 * H, H), "norm_out.linear.bias": (2 * H,),
            **{f"transformer_blocks.0.attn.{p}.{role}": (H, H) if role == "weight" else (H,)
               for p in qkv for role in ("weight", "bias")}}
    base, tuned = pair(tmp_path, keys, 7)
    lora = load_lora(extracted(tmp_path))
    assert set(lora.modules) == {"transformer.x_embedder", "transformer.single_transformer_blocks.0.proj_out",
                                 "transformer.norm_out.linear", "lora_unet_final_layer_adaLN_modulation_1",
                                 "lora_unet_double_blocks_0_img_attn_qkv",
                                 *(f"transformer.transformer_blocks.0.attn.{p}" for p in qkv)}
    delta = {k: tuned[k] - base[k] for k in keys}
    fused = lora.modules["lora_unet_double_blocks_0_img_attn_qkv"]
    assert fused.kind == "full" and not fused.has_weight
    assert torch.allclose(fused.diff_b, torch.cat([delta[f"transformer_blocks.0.attn.{p}.bias"] for p in qkv]))
    half = delta["norm_out.linear.bias"][:H], delta["norm_out.linear.bias"][H:]
    assert torch.allclose(lora.modules["lora_unet_final_layer_adaLN_modulation_1"].diff_b, torch.cat(half[::-1]))
    got = baked_file(tmp_path / "base.safetensors", tmp_path / "lora.safetensors")
    for k, v in tuned.items():
        assert torch.allclose(got[k], v, atol=1e-5), k

    # into the same model in BFL's format (q|k|v fused): the parts' LoRAs join the fused bias in one module
    def fused(sd: dict, role: str) -> torch.Tensor:
        return torch.cat([sd[f"transformer_blocks.0.attn.{p}.{role}"] for p in qkv])

    roles = {"double_blocks.0.img_attn.qkv.weight": "weight", "double_blocks.0.img_attn.qkv.bias": "bias"}
    save_file({k: fused(base, role) for k, role in roles.items()}, str(tmp_path / "bfl.safetensors"))
    got = baked_file(tmp_path / "bfl.safetensors", tmp_path / "lora.safetensors")
    for k, role in roles.items():
        assert torch.allclose(got[k], fused(tuned, role), atol=1e-5), k
