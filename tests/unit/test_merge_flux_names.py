"""Flux LoRAs named the kohya way and the diffusers way (and BFL, OneTrainer) merge module by module: the
diffusers q, k, v (and proj_mlp) LoRAs are row blocks of the fused kohya weight, norm_out.linear is the final
adaLN modulation with its halves swapped.  References are dense, from the raw tensors, row offsets spelled
out in flux_synth."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from merge_core.errors import MergeCoreError
from merge_core.lora_file import load_lora
from merge_core.lowrank import RankRule
from merge_core.merge import merge_loras

from flux_synth import DIFFUSERS, H, diffusers_file, kohya_file
from merge_testlib import one_torch_thread  # noqa: F401


def dense_result(result) -> dict[str, torch.Tensor]:
    return {name: m.delta().double() for name, m in result.modules.items()}


def check_sum(result, parts, weights):
    names = set().union(*parts)
    assert set(result.modules) == names
    got = dense_result(result)
    for name in names:
        want = sum(w * p[name] for w, p in zip(weights, parts) if name in p)
        assert torch.allclose(got[name], want, rtol=0, atol=1e-5 * float(want.abs().max())), name


def test_kohya_and_diffusers_flux_loras_merge_module_by_module(tmp_path, caplog):
    kohya, diffusers = kohya_file(tmp_path / "k.safetensors"), diffusers_file(tmp_path / "d.safetensors")
    sets = [load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "d.safetensors")]
    with caplog.at_level("WARNING"):
        result = merge_loras(sets, "concat", weights=[1.0, -0.5])
    assert caplog.records == []  # modules shared: no "merged with nothing" warning
    check_sum(result, [kohya, diffusers], [1.0, -0.5])
    assert result.modules["lora_unet_single_blocks_0_linear1"].rank == 4 + 2 + 2  # kohya's 4, to_k's 2, proj_mlp's 2
    # no input has kohya's img_attn_proj or guidance_in: those diffusers modules keep their names
    assert {"transformer.transformer_blocks.0.attn.to_out.0", "transformer.time_text_embed.guidance_embedder.linear_1"
            } < set(result.modules)
    # svd at the full rank of the sum gives T itself
    exact = merge_loras(sets, "svd", weights=[0.3, 0.7], rule=RankRule(rank=3 * H))
    check_sum(exact, [kohya, diffusers], [0.3, 0.7])
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


def test_a_flux_part_that_is_not_a_lora_is_one_clear_error(tmp_path):
    kohya_file(tmp_path / "k.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.randn(2, 2, generator=g),
               "transformer.transformer_blocks.0.attn.to_q.lokr_w2": torch.randn(4, 4, generator=g)},
              str(tmp_path / "x.safetensors"))
    sets = [load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "x.safetensors")]
    with pytest.raises(MergeCoreError, match=r"Flux module 'transformer\.transformer_blocks\.0\.attn\.to_q' is a lokr "
                                             r"module; joining q, k, v into one weight is done only for a linear LoRA"):
        merge_loras(sets, "concat")
