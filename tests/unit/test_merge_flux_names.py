"""Flux LoRAs named the kohya way and the diffusers way (and BFL, OneTrainer) merge module by module: the
diffusers q, k, v (and proj_mlp) LoRAs are row blocks of the fused kohya weight, norm_out.linear is the final
adaLN modulation with its halves swapped.  References are dense, from the raw tensors, row offsets spelled
out in flux_synth."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_core.errors import MergeCoreError
from merge_core.keys.blocks import block_runs
from merge_core.lora_file import load_lora, summary, summary_lines
from merge_core.fuse import fuse_models
from merge_core.merge import merge_loras, parse_block_weights

from flux_synth import DIFFUSERS, H, KOHYA, diffusers_file, kohya_file
from merge_testlib import check_sum, dense_result, merged_two_ways, one_torch_thread  # noqa: F401


def test_kohya_and_diffusers_flux_loras_merge_module_by_module(tmp_path, caplog):
    result, exact = merged_two_ways(tmp_path, caplog, kohya_file, diffusers_file, full_rank=3 * H)
    assert result.modules["lora_unet_single_blocks_0_linear1"].rank == 4 + 2 + 2  # kohya's 4, to_k's 2, proj_mlp's 2
    # no input has kohya's img_attn_proj or guidance_in: those diffusers modules keep their names
    assert {"transformer.transformer_blocks.0.attn.to_out.0", "transformer.time_text_embed.guidance_embedder.linear_1"
            } < set(result.modules)
    assert set(load_lora(exact.save(tmp_path / "m.safetensors")).modules) == set(exact.modules)


@pytest.mark.parametrize("prefix,sep", [("base_model.model.", "."), ("lora_transformer_", "_"), ("lycoris_", "_")])
def test_other_flux_namings_match_too(tmp_path, prefix, sep):
    """PEFT folder paths, OneTrainer's and SimpleTuner LyCORIS's underscored names; BFL's dotted names."""
    kohya = kohya_file(tmp_path / "b.safetensors", bfl=True)
    diffusers = diffusers_file(tmp_path / "d.safetensors", prefix, sep)
    result = merge_loras([load_lora(tmp_path / "b.safetensors"), load_lora(tmp_path / "d.safetensors")], "concat",
                         weights=[0.5, 2.0])
    check_sum(result, [kohya, diffusers], [0.5, 2.0])


def test_flux_loras_named_one_way_keep_their_names(tmp_path):
    diffusers_file(tmp_path / "a.safetensors", seed=3)
    diffusers_file(tmp_path / "b.safetensors", seed=4)
    result = merge_loras([load_lora(tmp_path / "a.safetensors"), load_lora(tmp_path / "b.safetensors")], "concat")
    assert set(result.modules) == {"transformer." + n for n in DIFFUSERS} | {"transformer.norm_out.linear"}


def test_a_flux_part_that_is_not_a_lora_keeps_its_name_with_a_warning(tmp_path, caplog):
    """A LoKr q cannot join the fused qkv LoRA: it is carried beside it under its own name (ComfyUI applies it
    to q's rows, as when stacking), the LoRA parts are still joined."""
    kohya = kohya_file(tmp_path / "k.safetensors")
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(2, 2, generator=g), torch.randn(4, 4, generator=g)
    up, down = torch.randn(H, 2, generator=g), torch.randn(2, H, generator=g)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lokr_w1": w1,
               "transformer.transformer_blocks.0.attn.to_q.lokr_w2": w2,
               "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": down,
               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": up}, str(tmp_path / "x.safetensors"))
    sets = [load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "x.safetensors")]
    with caplog.at_level("WARNING"):
        result = merge_loras(sets, "concat")
    assert [r.getMessage() for r in caplog.records] == [
        f"1 module(s) of {tmp_path / 'x.safetensors'} that are parts of fused weights are not plain linear LoRAs "
        "(e.g. 'transformer.transformer_blocks.0.attn.to_q', lokr) and keep their diffusers names: only a LoRA's "
        "rows join a fused kohya weight; they are carried beside it, as ComfyUI stacks them"]
    qkv = torch.zeros(3 * H, H, dtype=torch.float64)
    qkv[H:2 * H] = up.double() @ down.double()
    got = dense_result(result)
    assert torch.allclose(got["lora_unet_double_blocks_0_img_attn_qkv"],
                          kohya["lora_unet_double_blocks_0_img_attn_qkv"] + qkv, atol=1e-5)
    assert torch.allclose(got["transformer.transformer_blocks.0.attn.to_q"], torch.kron(w1, w2).double(), atol=1e-6)


# the Flux.1 block of each module flux_synth writes, by hand, first match in this order (BASE: outside the double
# and single blocks)
BLOCK = {"single_transformer_blocks_0": "S00", "transformer_blocks_0": "D00", "double_blocks_0": "D00",
         "single_blocks_0": "S00"}


def block_by_hand(name: str) -> str:
    underscored = "_" + name.replace(".", "_") + "_"
    return next((b for part, b in BLOCK.items() if f"_{part}_" in underscored), "BASE")


def flux_vector(base: float, d00: float, s00: float) -> list[float]:
    """58 values BASE, D00-D18, S00-S37; the blocks the tiny Flux lacks get 9 (a wrong index would show)."""
    values = [9.0] * 58
    values[0], values[1], values[20] = base, d00, s00
    return values


def test_flux_block_weights_scale_each_input_per_block_in_any_naming(tmp_path):
    kohya, diffusers = kohya_file(tmp_path / "k.safetensors"), diffusers_file(tmp_path / "d.safetensors")
    blocks = {"BASE": (0.5, 3.0), "D00": (2.0, 0.25), "S00": (-1.0, 0.0)}
    vectors = [flux_vector(*(blocks[b][i] for b in ("BASE", "D00", "S00"))) for i in range(2)]
    sets = [load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "d.safetensors")]
    result = merge_loras(sets, "concat", weights=[1.0, -0.5], block_weights=vectors)
    got = dense_result(result)
    assert {block_by_hand(n) for n in got} == {"BASE", "D00", "S00"}
    for name, delta in got.items():
        b = blocks[block_by_hand(name)]
        want = sum(w * s * p[name] for w, s, p in zip((1.0, -0.5), b, (kohya, diffusers)) if name in p)
        assert torch.allclose(delta, want, rtol=0, atol=1e-5 * float(want.abs().max())), name
    # BFL's dotted names alone keep their names and their blocks
    bfl = kohya_file(tmp_path / "b.safetensors", bfl=True)
    alone = dense_result(merge_loras([load_lora(tmp_path / "b.safetensors")], "concat",
                                     block_weights=[flux_vector(0.5, 2.0, -1.0)]))
    assert set(alone) == {"diffusion_model." + path for path, _ in KOHYA.values()}
    for name, (path, _) in KOHYA.items():
        scale = {"BASE": 0.5, "D00": 2.0, "S00": -1.0}[block_by_hand(path)]
        assert torch.allclose(alone["diffusion_model." + path], scale * bfl["lora_unet_" + name], atol=1e-5), path


def test_flux_modules_the_diffusers_table_lacks_get_their_blocks_weight(tmp_path):
    """A LyCORIS diff on a double block's attn.norm_q or a single block's attn.norm_k (no row of a kohya weight,
    so not in the diffusers table) is in that block by its name, not in BASE."""
    diffusers_file(tmp_path / "d.safetensors")
    norm_q, norm_k = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([0.25, 4.0, -1.0, 2.0])
    with safe_open(tmp_path / "d.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**sd, "transformer.transformer_blocks.0.attn.norm_q.diff": norm_q,
               "transformer.single_transformer_blocks.0.attn.norm_k.diff": norm_k}, str(tmp_path / "d.safetensors"))
    lset = load_lora(tmp_path / "d.safetensors")
    assert summary(lset)["blocks"]["held"] == ["BASE", "D00", "S00"]
    got = merge_loras([lset], "concat", block_weights=[parse_block_weights("BASE=0.5, D=2, S=-1")]).modules
    assert torch.equal(got["transformer.transformer_blocks.0.attn.norm_q"].diff, 2 * norm_q)
    assert torch.equal(got["transformer.single_transformer_blocks.0.attn.norm_k"].diff, -norm_k)


def test_flux_block_weights_beyond_flux1_and_errors(tmp_path):
    """Named pairs reach the blocks a Flux-style LoRA holds beyond Flux.1's (Flux.2's single blocks 38-47,
    HunyuanVideo's); the 58-value form refuses them, and SDXL forms refuse a Flux LoRA."""
    kohya = kohya_file(tmp_path / "k.safetensors")
    flux = load_lora(tmp_path / "k.safetensors")
    with pytest.raises(MergeCoreError, match=r"^20 block weights are SDXL's; .*k.safetensors is other \(a Flux LoRA "
                                             r"takes 58 values or D/S names\)$"):
        merge_loras([flux], block_weights=[[1.0] * 20])
    with pytest.raises(MergeCoreError, match=r"^block weights: .*k.safetensors has no block D19 \(BASE, D00-D18, "
                                             r"S00-S37\)$"):
        merge_loras([flux], block_weights=[parse_block_weights("D19=0")])
    g = torch.Generator().manual_seed(8)
    up, down = torch.randn(H, 2, generator=g), torch.randn(2, 5 * H, generator=g)
    save_file({"lora_unet_single_blocks_40_linear2.lora_up.weight": up,
               "lora_unet_single_blocks_40_linear2.lora_down.weight": down}, str(tmp_path / "s40.safetensors"))
    sets = [flux, load_lora(tmp_path / "s40.safetensors")]
    with pytest.raises(MergeCoreError, match="^58 block weights are for Flux.1's 19 double and 38 single blocks; "
                                             "module 'lora_unet_single_blocks_40_linear2' is in block S40 "):
        merge_loras(sets, block_weights=[None, [1.0] * 58])
    result = dense_result(merge_loras(sets, "concat", block_weights=[parse_block_weights("S=0.5, D0=-1")] * 2))
    assert torch.allclose(result["lora_unet_single_blocks_40_linear2"], 0.5 * up.double() @ down.double(), atol=1e-5)
    assert torch.allclose(result["lora_unet_double_blocks_0_img_attn_qkv"],
                          -kohya["lora_unet_double_blocks_0_img_attn_qkv"], atol=1e-5)
    assert torch.allclose(result["lora_unet_img_in"], kohya["lora_unet_img_in"], atol=1e-5)


def test_fuse_matches_the_two_flux_namings_too(tmp_path):
    """fuse's weighted_sum is the same T = Σ wᵢΔWᵢ per kohya module (output form full: exact deltas)."""
    kohya, diffusers = kohya_file(tmp_path / "k.safetensors"), diffusers_file(tmp_path / "d.safetensors")
    sets = [load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "d.safetensors")]
    result = fuse_models(sets, [0.6, 0.9], strategy="weighted_sum", output_format="full")
    check_sum(result, [kohya, diffusers], [0.6, 0.9])


def test_flux_clip_l_modules_match_across_namings(tmp_path):
    """CLIP-L of a Flux LoRA: diffusers text_encoder.text_model.… is kohya's lora_te1_text_model_…."""
    g = torch.Generator().manual_seed(5)
    te = "text_model.encoder.layers.0.mlp.fc1"
    ku, kd, du, dd = (torch.randn(*shape, generator=g) for shape in ((12, 2), (2, 6), (12, 3), (3, 6)))
    qkv_up, qkv_down, q_up, q_down = (torch.randn(*shape, generator=g)
                                      for shape in ((3 * H, 2), (2, H), (H, 2), (2, H)))
    save_file({"lora_te1_" + te.replace(".", "_") + ".lora_up.weight": ku,
               "lora_te1_" + te.replace(".", "_") + ".lora_down.weight": kd,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv_up,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qkv_down}, str(tmp_path / "k.safetensors"))
    save_file({f"text_encoder.{te}.lora_B.weight": du, f"text_encoder.{te}.lora_A.weight": dd,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": q_up,
               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": q_down}, str(tmp_path / "d.safetensors"))
    result = merge_loras([load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "d.safetensors")], "concat",
                         weights=[1.0, 0.25])
    assert set(result.modules) == {"lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                   "lora_unet_double_blocks_0_img_attn_qkv"}
    want = ku.double() @ kd.double() + 0.25 * du.double() @ dd.double()
    assert torch.allclose(dense_result(result)["lora_te1_text_model_encoder_layers_0_mlp_fc1"], want, atol=1e-5)


def test_a_flux_merge_keeps_the_base_model_its_inputs_name(tmp_path):
    meta = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}
    kohya_file(tmp_path / "a.safetensors", seed=1, metadata=meta)
    kohya_file(tmp_path / "b.safetensors", seed=2, metadata=meta)
    out = merge_loras([load_lora(tmp_path / "a.safetensors"), load_lora(tmp_path / "b.safetensors")]).save(
        tmp_path / "m.safetensors")
    written = load_lora(out).metadata
    assert {k: written[k] for k in meta} == meta


def test_inspect_names_flux_style_blocks_and_how_they_are_named(tmp_path):
    """Flux-style names (which HunyuanVideo shares, so not a claim about the model): kohya's double/single blocks,
    or diffusers names only Flux's layout has; a diffusers LoRA of other models (SD3, Qwen-Image) is not."""
    kohya_file(tmp_path / "k.safetensors")
    diffusers_file(tmp_path / "d.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(4, 2)},
              str(tmp_path / "q.safetensors"))
    k, d, q = (summary(load_lora(tmp_path / f"{n}.safetensors")) for n in "kdq")
    assert (k["flux_naming"], d["flux_naming"], q["flux_naming"]) == ("kohya", "diffusers", None)
    assert dict(summary_lines(k))["format"] == "kohya names, architecture other (Flux-style blocks)"
    assert dict(summary_lines(d))["format"] == ("peft names, architecture other (Flux-style blocks, diffusers module "
                                                "names with q/k/v split)")
    assert dict(summary_lines(q))["format"] == "peft names, architecture other"
    # the blocks, for block weights: double block 0, single block 0, and the layers outside them
    assert dict(summary_lines(k))["blocks"] == dict(summary_lines(d))["blocks"] == "Flux BASE, D00, S00"
    assert q["blocks"] is None and "blocks" not in dict(summary_lines(q))
    assert block_runs(["BASE", "D00", "D02", "D03", "S00", "S01", "D19"]) == "BASE, D00, D02-D03, S00-S01, D19"


def test_kohya_and_comfyui_names_of_any_model_match(tmp_path):
    """Wan as musubi-tuner names it (lora_unet_blocks_0_self_attn_q) and as ComfyUI-side trainers do
    (diffusion_model.blocks.0.self_attn.q): one weight, merged under the kohya name; a dotted module no other
    input holds keeps its name (ComfyUI reads it as it is)."""
    g = torch.Generator().manual_seed(7)
    ku, kd, du, dd = (torch.randn(*shape, generator=g) for shape in ((6, 2), (2, 6), (6, 3), (3, 6)))
    save_file({"lora_unet_blocks_0_self_attn_q.lora_up.weight": ku,
               "lora_unet_blocks_0_self_attn_q.lora_down.weight": kd}, str(tmp_path / "k.safetensors"))
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_B.weight": du,
               "diffusion_model.blocks.0.self_attn.q.lora_A.weight": dd,
               "diffusion_model.blocks.0.ffn.0.lora_B.weight": du.clone(),
               "diffusion_model.blocks.0.ffn.0.lora_A.weight": dd.clone()}, str(tmp_path / "d.safetensors"))
    result = merge_loras([load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "d.safetensors")], "concat",
                         weights=[1.0, -1.0])
    assert set(result.modules) == {"lora_unet_blocks_0_self_attn_q", "diffusion_model.blocks.0.ffn.0"}
    want = ku.double() @ kd.double() - du.double() @ dd.double()
    assert torch.allclose(dense_result(result)["lora_unet_blocks_0_self_attn_q"], want, atol=1e-5)


def test_prefixed_names_of_a_model_whose_diffusers_paths_are_its_own_match_kohya_ones(tmp_path):
    """Qwen-Image's module paths are the same in its diffusers and ComfyUI forms: musubi-tuner's
    lora_unet_transformer_blocks_0_attn_to_q, AI-Toolkit's transformer.…, SimpleTuner's lycoris_…, ComfyUI's
    diffusion_model.… and DiffSynth-Studio's bare path (lora_A.default) are one weight (Flux's own reading of
    transformer_blocks.0.attn.to_q, a third of a fused qkv, is not taken: no input holds that fused module)."""
    g = torch.Generator().manual_seed(9)
    names = {"k": ("lora_unet_transformer_blocks_0_attn_to_q", "lora_up", "lora_down"),
             "t": ("transformer.transformer_blocks.0.attn.to_q", "lora_B", "lora_A"),
             "l": ("lycoris_transformer_blocks_0_attn_to_q", "lora_up", "lora_down"),
             "d": ("diffusion_model.transformer_blocks.0.attn.to_q", "lora_B", "lora_A"),
             "b": ("transformer_blocks.0.attn.to_q", "lora_B.default", "lora_A.default")}
    want = torch.zeros(6, 6, dtype=torch.float64)
    sets = []
    for tag, (name, up_key, down_key) in names.items():
        up, down = torch.randn(6, 2, generator=g), torch.randn(2, 6, generator=g)
        save_file({f"{name}.{up_key}.weight": up, f"{name}.{down_key}.weight": down},
                  str(tmp_path / f"{tag}.safetensors"))
        sets.append(load_lora(tmp_path / f"{tag}.safetensors"))
        want += 0.5 * up.double() @ down.double()
    result = merge_loras(sets, "concat", weights=[0.5] * 5)
    assert list(result.modules) == ["lora_unet_transformer_blocks_0_attn_to_q"]
    assert torch.allclose(dense_result(result)["lora_unet_transformer_blocks_0_attn_to_q"], want, atol=1e-5)


def test_two_diffusers_style_inputs_alone_keep_their_names(tmp_path):
    """AI-Toolkit's transformer.…, SimpleTuner's lycoris_… and a bare path with no input named the model's way:
    nothing says whether transformer_blocks.0.attn.to_q is Qwen-Image's own layer or a third of Flux's fused qkv,
    so none is renamed (side by side, each as ComfyUI reads it, with the usual warning)."""
    g = torch.Generator().manual_seed(3)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(6, 2, generator=g),
               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 6, generator=g)},
              str(tmp_path / "t.safetensors"))
    save_file({"lycoris_transformer_blocks_0_attn_to_q.lora_up.weight": torch.randn(6, 2, generator=g),
               "lycoris_transformer_blocks_0_attn_to_q.lora_down.weight": torch.randn(2, 6, generator=g)},
              str(tmp_path / "l.safetensors"))
    save_file({"transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(6, 2, generator=g),
               "transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 6, generator=g)},
              str(tmp_path / "b.safetensors"))
    result = merge_loras([load_lora(tmp_path / f"{tag}.safetensors") for tag in "tlb"], "concat")
    assert set(result.modules) == {"transformer.transformer_blocks.0.attn.to_q",
                                   "lycoris_transformer_blocks_0_attn_to_q", "transformer_blocks.0.attn.to_q"}
