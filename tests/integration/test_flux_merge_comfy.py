"""A kohya-named and a diffusers-named Flux LoRA, merged, do in a real ComfyUI (0.3.75, in-process) what the two
stacked in LoraLoader do: on a tiny Flux ComfyUI builds itself (weights zeroed, so a patched weight is the ΔW
ComfyUI applies), the merged file's patches equal the stack's on every weight, with ComfyUI's own slices of
the fused q|k|v / linear1 weights and its shift/scale swap of norm_out; no "lora key not loaded"."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from comfy_host import load_lora_with_comfy  # noqa: E402
from comfy_host.fixtures import comfy_inprocess  # noqa: E402,F401
from comfy_host.tiny_models import applied, tiny_model  # noqa: E402
from flux_synth import CONFIG, diffusers_file, kohya_file  # noqa: E402
from merge_core.cli import main  # noqa: E402

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def flux(comfy_inprocess):  # noqa: F811
    """ComfyUI's Flux model of flux_synth.CONFIG, weights zeroed, in a ModelPatcher; and its LoRA key map."""
    return tiny_model(CONFIG, "Flux")


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_kohya_and_diffusers_flux_merge_applies_as_the_stack_in_comfyui(flux, tmp_path, method):
    kohya_file(tmp_path / "k.safetensors")
    diffusers_file(tmp_path / "d.safetensors")
    out = tmp_path / "merged.safetensors"
    extra = ["--rank", "16"] if method == "svd" else []  # above the sum's rank 8: exact
    assert main(["merge", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"), "--method", method,
                 "--weights", "0.8", "-0.5", "--dtype", "fp32", "-o", str(out), *extra]) == 0
    _, not_loaded = load_lora_with_comfy(load_file(str(out)), flux[1])
    assert not_loaded == []
    stacked = applied(flux[0], [(tmp_path / "k.safetensors", 0.8), (tmp_path / "d.safetensors", -0.5)])
    merged = applied(flux[0], [(out, 1.0)])
    assert len(stacked) == 8 and set(merged) == set(stacked)  # every weight either file patches
    for key, want in stacked.items():
        assert float((merged[key] - want).norm()) <= 1e-5 * float(want.norm()), key

