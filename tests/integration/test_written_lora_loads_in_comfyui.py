"""A LoRA written by merge_core for SDXL — all 986 modules plus the LoCon conv modules, and LyCORIS kinds —
goes through the real ComfyUI 0.3.75 LoRA loader with zero "lora key not loaded" and one patch per module."""
import pytest
import torch

from merge_core.adapters import FullDiff, LoHa, LoKr
from merge_core.lora_file import load_lora, save_lora
from safetensors.torch import load_file
from synth import randn, sdxl_lora, sdxl_specs

pytestmark = pytest.mark.comfyui


def comfy_load(path):
    from comfy_host import load_lora_with_comfy
    return load_lora_with_comfy(load_file(str(path)))


def test_full_sdxl_locon_lora_written_by_merge_core_loads_with_every_key(tmp_path, comfy_inprocess):
    specs = sdxl_specs(locon=True)
    assert len(specs) == 986 + sum(1 for s in specs if s.locon)
    path = save_lora(sdxl_lora(specs, rank=2, alpha=1.0), tmp_path / "full.safetensors")
    patches, not_loaded = comfy_load(path)
    assert not_loaded == []
    assert len(patches) == len(specs)
    assert {s.key for s in specs} == set(patches)


def test_lycoris_kinds_and_diffs_written_by_merge_core_load(tmp_path, comfy_inprocess):
    specs = sdxl_specs(per_group=4, locon=True)
    mods = dict(sdxl_lora(specs, rank=2))
    conv = next(s for s in specs if s.kind == "conv" and s.shape[2:] == (3, 3))
    lin = next(s for s in specs if s.group == "unet" and not s.locon)
    te = next(s for s in specs if s.group == "te1")
    out, n = lin.shape
    mods[lin.name] = LoHa(randn(out, 2), randn(2, n), randn(out, 2), randn(2, n), alpha=1.0)
    mods[te.name] = LoKr(w1=randn(4, 4), w2a=randn(te.shape[0] // 4, 2), w2b=randn(2, te.shape[1] // 4), alpha=1.0)
    mods[conv.name] = FullDiff(randn(*conv.shape, scale=1e-3), diff_b=randn(conv.shape[0], scale=1e-3))
    path = save_lora(mods, tmp_path / "lyco.safetensors", dtype="fp32")
    patches, not_loaded = comfy_load(path)
    assert not_loaded == []
    assert len(patches) == len(specs) + 1  # the conv's bias diff is its own patch
    # and merge_core reads back what it wrote
    back = load_lora(path)
    for name, m in mods.items():
        assert torch.allclose(back.modules[name].delta(), m.delta(), atol=1e-5), name
