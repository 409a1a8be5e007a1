"""A LoRA extracted from two diffusion models saved on their own (no prefix, as ComfyUI's
models/diffusion_models/ holds them: Flux as BFL ships it, Z-Image as Comfy-Org repackages it) loads in a real
ComfyUI (0.3.75, in-process) with no "lora key not loaded", and through its LoraLoader on the base gives the
tuned weights back (changes of rank 2 at extraction rank 4: exact up to fp32)."""
from __future__ import annotations

import sys
from pathlib import Path

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
from comfy_host.tiny_models import tiny_model  # noqa: E402
from merge_core.cli import main  # noqa: E402

pytestmark = pytest.mark.comfyui
PREFIX = "diffusion_model."


@pytest.mark.parametrize("config,model_class", [(flux_synth.CONFIG, "Flux"), (zimage_synth.CONFIG, "Lumina2")])
def test_a_lora_extracted_from_bare_model_files_patches_every_changed_weight(comfy_inprocess, tmp_path,  # noqa: F811
                                                                              config, model_class):
    patcher, key_map = tiny_model(config, model_class)
    g = torch.Generator().manual_seed(0)
    base = {k[len(PREFIX):]: torch.randn(v.shape, generator=g)
            for k, v in patcher.model.state_dict().items() if k.startswith(PREFIX)}
    tuned = {k: v + 0.1 * (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v[0].numel(), generator=g)
                           ).reshape(v.shape) if v.dim() >= 2 else v + 0.1 * torch.randn(v.shape, generator=g)
             for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    lora = tmp_path / "lora.safetensors"
    assert main(["extract", "--source-model", str(tmp_path / "base.safetensors"), "--target-model",
                 str(tmp_path / "tuned.safetensors"), "--rank", "4", "--output-dtype", "fp32", "-o", str(lora)]) == 0
    patches, not_loaded = load_lora_with_comfy(load_file(str(lora)), key_map)
    assert not_loaded == []
    import comfy.lora

    patched = {}
    for k, adapter in patches.items():
        key = k if isinstance(k, str) else k[0]
        patched[key] = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)],
                                                   base[key[len(PREFIX):]].clone(), key)
    assert set(patched) == {PREFIX + k for k in base}  # every tensor changed, every one patched
    for key, weight in patched.items():
        want = tuned[key[len(PREFIX):]]
        assert torch.allclose(weight, want, atol=1e-4 * float(want.abs().max())), key
