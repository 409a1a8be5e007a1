"""A LoRA extracted from two diffusion models saved on their own (no prefix, as ComfyUI's
models/diffusion_models/ holds them: Flux as BFL ships it, Z-Image as Comfy-Org repackages it) loads in a real
ComfyUI (0.3.75, in-process) with no "lora key not loaded", and through its LoraLoader on the base gives the
tuned weights back (changes of rank 2 at extraction rank 4: exact up to fp32).  So does one extracted from two
Z-Image or Flux transformers in diffusers' format (q, k, v apart), onto ComfyUI's fused model."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import flux_synth  # noqa: E402
import zimage_synth  # noqa: E402
from comfy_host import load_lora_with_comfy  # noqa: E402
from comfy_host.fixtures import comfy_inprocess  # noqa: E402,F401
from comfy_host.tiny_models import applied, tiny_model  # noqa: E402
from merge_core.cli import main  # noqa: E402

pytestmark = pytest.mark.comfyui
PREFIX = "diffusion_model."


def changed(base: dict, g: torch.Generator) -> dict:
    """`base` with a rank-2 change on every matrix (extracted exactly at rank 4) and a small one elsewhere."""
    return {k: v + 0.1 * (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v[0].numel(), generator=g)
                          ).reshape(v.shape) if v.dim() >= 2 else v + 0.1 * torch.randn(v.shape, generator=g)
            for k, v in base.items()}


def extract(tmp_path, base: dict, tuned: dict) -> Path:
    """The CLI's rank-4 fp32 LoRA of tuned - base, both saved as they are."""
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    lora = tmp_path / "lora.safetensors"
    assert main(["extract", "--source-model", str(tmp_path / "base.safetensors"), "--target-model",
                 str(tmp_path / "tuned.safetensors"), "--rank", "4", "--output-dtype", "fp32", "-o", str(lora)]) == 0
    return lora


def check_extract(tmp_path, config: dict, model_class: str, seed: int, as_file: Callable[[dict], dict]) -> None:
    """ComfyUI's tiny model with random weights (base) and a changed copy, written as files by `as_file` (from
    ComfyUI's keys), extracted: the LoRA loads with no key left over, and LoraLoader's patches put tuned - base
    on every weight."""
    patcher, key_map = tiny_model(config, model_class)
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(v.shape, generator=g) for k, v in patcher.model.state_dict().items()
            if k.startswith(PREFIX)}
    tuned = changed(base, g)
    lora = extract(tmp_path, as_file(base), as_file(tuned))
    _, not_loaded = load_lora_with_comfy(load_file(str(lora)), key_map)
    assert not_loaded == []
    got = applied(patcher, [(lora, 1.0)])
    assert set(got) == set(base)  # every tensor changed, every one patched
    for key, delta in got.items():
        want = tuned[key] - base[key]
        assert torch.allclose(delta, want, atol=1e-4 * float(want.abs().max())), key


@pytest.mark.parametrize("config,model_class", [(flux_synth.CONFIG, "Flux"), (zimage_synth.CONFIG, "Lumina2")])
def test_a_lora_extracted_from_bare_model_files_patches_every_changed_weight(comfy_inprocess, tmp_path,  # noqa: F811
                                                                              config, model_class):
    check_extract(tmp_path, config, model_class, 0, lambda sd: {k[len(PREFIX):]: v for k, v in sd.items()})


@pytest.mark.parametrize("config,model_class,to_diffusers", [
    (zimage_synth.CONFIG, "Lumina2", "z_image_to_diffusers"), (flux_synth.CONFIG, "Flux", "flux_to_diffusers")])
def test_a_lora_extracted_from_diffusers_format_files_patches_comfyuis_model(comfy_inprocess, tmp_path,  # noqa: F811
                                                                             config, model_class, to_diffusers):
    """Both files are ComfyUI's tiny model written with diffusers' names by ComfyUI's own map (comfy.utils: a
    diffusers key -> a ComfyUI key, or a row block of one, or one with its halves swapped); the LoRA, loaded by
    LoraLoader onto ComfyUI's model, puts tuned - base on every ComfyUI weight, q|k|v rows and all — the biases
    diffusers splits from a fused one too (Flux's q, k, v, proj_mlp, norm_out; no name places one alone), written
    stacked as the fused weight's `.diff_b`."""
    to_comfy = comfy_map(config, to_diffusers)
    assert any(isinstance(v, tuple) for v in to_comfy.values())  # q, k and v are rows of the fused qkv
    check_extract(tmp_path, config, model_class, 1, lambda sd: diffusers_format(sd, to_comfy))


def test_a_kohya_lora_bakes_into_a_diffusers_format_flux_as_comfyuis_map_splits_it(comfy_inprocess,  # noqa: F811
                                                                                    tmp_path):
    """A kohya LoRA extracted from BFL-format files (fused q|k|v, linear1, the final adaLN; their biases as
    .diff_b) baked into the same base written in diffusers' format by ComfyUI's own map gives that format's
    tuned file: every part, bias and swapped half where ComfyUI's map puts it."""
    patcher, _ = tiny_model(flux_synth.CONFIG, "Flux")
    g = torch.Generator().manual_seed(2)
    base = {k: torch.randn(v.shape, generator=g) for k, v in patcher.model.state_dict().items()
            if k.startswith(PREFIX)}
    tuned = changed(base, g)
    lora = extract(tmp_path, *({k[len(PREFIX):]: v for k, v in sd.items()} for sd in (base, tuned)))
    to_comfy = comfy_map(flux_synth.CONFIG, "flux_to_diffusers")
    save_file(diffusers_format(base, to_comfy), str(tmp_path / "diffusers_base.safetensors"))
    assert main(["bake", "--source-model", str(tmp_path / "diffusers_base.safetensors"), "--lora-model", str(lora),
                 "--output-dtype", "fp32", "-o", str(tmp_path / "baked.safetensors")]) == 0
    got, want = load_file(str(tmp_path / "baked.safetensors")), diffusers_format(tuned, to_comfy)
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=1e-5), key


def comfy_map(config: dict, to_diffusers: str) -> dict:
    """ComfyUI's own map of a model's diffusers keys (comfy.utils): key -> ComfyUI key, or (key, row block[, a
    function of it])."""
    import comfy.utils

    return getattr(comfy.utils, to_diffusers)(config, output_prefix=PREFIX)


def diffusers_format(sd: dict, to_comfy: dict) -> dict:
    """A state dict of ComfyUI's keys written with diffusers' names by ComfyUI's map (keys it does not map keep
    their path)."""
    mapped = {target_key(v) for v in to_comfy.values()}
    out = {k[len(PREFIX):]: v for k, v in sd.items() if k not in mapped}
    for key, target in to_comfy.items():
        if target_key(target) in sd:
            t = sd[target_key(target)]
            if not isinstance(target, str):
                t = t.narrow(*target[1]) if target[1] is not None else t
                t = target[2](t) if len(target) > 2 else t  # Flux's norm_out: its halves swapped (both ways)
            out[key] = t.contiguous()
    return out


def target_key(target) -> str:
    """The ComfyUI key of a z_image_to_diffusers value (a key, or (key, row block))."""
    return target if isinstance(target, str) else target[0]
