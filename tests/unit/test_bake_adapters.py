"""bake_lora for every adapter kind against dense references written here (explicit products, torch.kron):
LoRA (α/r, no alpha = 1), LoCon, LoHa, LoKr, .diff/.diff_b, TE2 q/k/v into in_proj blocks, text_projection
transposed, alias names (diffusers, the original extractor's), and the bake strength."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.bake import bake_lora

U = "model.diffusion_model."
G = "conditioner.embedders.1.model."
S = 0.7  # bake strength
BASE_SHAPES = {
    U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (12, 10),
    U + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight": (12, 10),
    U + "input_blocks.4.1.transformer_blocks.0.attn1.to_v.weight": (12, 10),
    U + "input_blocks.1.0.in_layers.2.weight": (8, 6, 3, 3),
    U + "input_blocks.1.0.in_layers.2.bias": (8,),
    U + "input_blocks.4.1.proj_out.weight": (12, 12),
    U + "out.0.weight": (12,),
    U + "out.0.bias": (12,),
    U + "time_embed.0.weight": (16, 6),
    U + "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight": (12, 20),
    G + "transformer.resblocks.0.attn.in_proj_weight": (3 * 16, 16),
    G + "transformer.resblocks.0.attn.in_proj_bias": (3 * 16,),
    G + "text_projection": (16, 9),
}


def rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    gen = torch.Generator().manual_seed(0)
    base = {k: rnd(gen, *s) for k, s in BASE_SHAPES.items()}
    save_file(base, str(d / "base.safetensors"))
    lora, ref = {}, {}

    # LoRA with alpha 3, rank 2 (kohya name)
    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    up, down = rnd(gen, 12, 2), rnd(gen, 2, 10)
    lora |= {f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.alpha": torch.tensor(3.0)}
    ref[U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"] = 1.5 * up @ down
    # LoRA without alpha (scale 1), diffusers name of the same kind of layer
    n = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    up, down = rnd(gen, 12, 3), rnd(gen, 3, 10)
    lora |= {f"{n}.lora.up.weight": up, f"{n}.lora.down.weight": down}
    ref[U + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"] = up @ down
    # the original extractor's name for a full checkpoint key: diffusion_model.<checkpoint key>, scale 1
    n = "diffusion_model.model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_v"
    up, down = rnd(gen, 12, 2), rnd(gen, 2, 10)
    lora |= {f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down}
    ref[U + "input_blocks.4.1.transformer_blocks.0.attn1.to_v.weight"] = up @ down
    # LoCon 3x3 with a bias diff
    n = "lora_unet_input_blocks_1_0_in_layers_2"
    up, down, b = rnd(gen, 8, 2, 1, 1), rnd(gen, 2, 6, 3, 3), rnd(gen, 8)
    lora |= {f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.alpha": torch.tensor(1.0),
             f"{n}.diff_b": b}
    ref[U + "input_blocks.1.0.in_layers.2.weight"] = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(8, 6, 3, 3)
    ref[U + "input_blocks.1.0.in_layers.2.bias"] = b
    # LoHa
    n = "lora_unet_input_blocks_4_1_proj_out"
    w1a, w1b, w2a, w2b = rnd(gen, 12, 2), rnd(gen, 2, 12), rnd(gen, 12, 2), rnd(gen, 2, 12)
    lora |= {f"{n}.hada_w1_a": w1a, f"{n}.hada_w1_b": w1b, f"{n}.hada_w2_a": w2a, f"{n}.hada_w2_b": w2b,
             f"{n}.alpha": torch.tensor(1.0)}
    ref[U + "input_blocks.4.1.proj_out.weight"] = 0.5 * (w1a @ w1b) * (w2a @ w2b)
    # LoKr: full w1 (3x4), factorised w2 (4x2 @ 2x5), alpha 4 -> scale 4/2
    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2"
    w1, w2a, w2b = rnd(gen, 3, 4), rnd(gen, 4, 2), rnd(gen, 2, 5)
    lora |= {f"{n}.lokr_w1": w1, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b, f"{n}.alpha": torch.tensor(4.0)}
    ref[U + "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight"] = 2.0 * torch.kron(w1, w2a @ w2b)
    # full diffs of a norm (weight and bias)
    n = "lora_unet_out_0"
    dw, db = rnd(gen, 12), rnd(gen, 12)
    lora |= {f"{n}.diff": dw, f"{n}.diff_b": db}
    ref[U + "out.0.weight"], ref[U + "out.0.bias"] = dw, db
    # TE2 q/k/v and text_projection (ComfyUI orientation: out 9, in 16)
    blocks, biases = [], []
    for p in ("q", "k", "v"):
        n = f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj"
        up, down, b = rnd(gen, 16, 2), rnd(gen, 2, 16), rnd(gen, 16)
        lora |= {f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.diff_b": b}
        blocks.append(up @ down)
        biases.append(b)
    ref[G + "transformer.resblocks.0.attn.in_proj_weight"] = torch.cat(blocks)
    ref[G + "transformer.resblocks.0.attn.in_proj_bias"] = torch.cat(biases)
    up, down = rnd(gen, 9, 2), rnd(gen, 2, 16)
    lora |= {"lora_te2_text_projection.lora_up.weight": up, "lora_te2_text_projection.lora_down.weight": down}
    ref[G + "text_projection"] = (up @ down).T
    save_file(lora, str(d / "lora.safetensors"))
    report = bake_lora(d / "base.safetensors", d / "lora.safetensors", d / "out.safetensors", alpha=S, device="cpu")
    return base, ref, load_file(str(d / "out.safetensors")), report


def test_every_adapter_kind_bakes_to_its_dense_delta(setup):
    base, ref, out, report = setup
    assert report["skipped"] == []
    assert report["patched_keys"] == len(ref) and len(report["matched"]) == 11
    for key in BASE_SHAPES:
        expect = base[key] + S * ref[key] if key in ref else base[key]
        torch.testing.assert_close(out[key], expect, rtol=1e-5, atol=1e-5, msg=key)
    assert torch.equal(out[U + "time_embed.0.weight"], base[U + "time_embed.0.weight"])


def column_norms(W: torch.Tensor) -> torch.Tensor:
    """‖W[:, j, …]‖ for each input column j, written out per column."""
    return torch.stack([W[:, j].norm() for j in range(W.shape[1])])


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_modules_bake_as_comfyui_decomposes_them(tmp_path, strength):
    """kohya DoRA (dora_scale 1×in) on a Linear and a 3×3 LoCon: m·W_c/‖W_c‖ per input column; PEFT-style (out×1):
    m·W_c/‖W‖ per output row, the base's norms (ComfyUI 0.3.75's rule); then W + s·(that − W)."""
    gen = torch.Generator().manual_seed(3)
    q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    conv, proj = U + "input_blocks.1.0.in_layers.2.weight", U + "input_blocks.4.1.proj_out.weight"
    base = {k: rnd(gen, *BASE_SHAPES[k]) for k in (q, conv, proj)}
    save_file(base, str(tmp_path / "base.safetensors"))
    lora, expect = {}, {}

    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    up, down, m = rnd(gen, 12, 2), rnd(gen, 2, 10), rnd(gen, 1, 10).abs()
    lora |= {f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.alpha": torch.tensor(1.0),
             f"{n}.dora_scale": m}
    Wc = base[q] + 0.5 * up @ down
    expect[q] = Wc * (m[0] / (column_norms(Wc) + torch.finfo(torch.float32).eps))

    n = "lora_unet_input_blocks_1_0_in_layers_2"
    up, down, m = rnd(gen, 8, 2, 1, 1), rnd(gen, 2, 6, 3, 3), rnd(gen, 1, 6, 1, 1).abs()
    lora |= {f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.dora_scale": m}
    Wc = base[conv] + (up.flatten(1) @ down.flatten(1)).reshape(8, 6, 3, 3)
    expect[conv] = Wc * (m.flatten() / (column_norms(Wc) + torch.finfo(torch.float32).eps))[None, :, None, None]

    n = "lora_unet_input_blocks_4_1_proj_out"
    up, down, m = rnd(gen, 12, 3), rnd(gen, 3, 12), rnd(gen, 12, 1).abs()
    lora |= {f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.dora_scale": m}
    Wc = base[proj] + up @ down
    row_norms = torch.stack([base[proj][i].norm() for i in range(12)])
    expect[proj] = Wc * (m[:, 0] / (row_norms + torch.finfo(torch.float32).eps))[:, None]

    save_file(lora, str(tmp_path / "dora.safetensors"))
    report = bake_lora(tmp_path / "base.safetensors", tmp_path / "dora.safetensors", tmp_path / "out.safetensors",
                       alpha=strength, device="cpu")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert report["skipped"] == [] and report["dora_modules"] == 3
    for key, want in expect.items():
        torch.testing.assert_close(out[key], base[key] + strength * (want - base[key]), rtol=1e-5, atol=1e-6,
                                   msg=key)
