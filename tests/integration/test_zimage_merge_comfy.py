"""Z-Image LoRAs named ComfyUI's way and AI-Toolkit's way, merged, do in a real ComfyUI (0.3.75, in-process) what
the two stacked in LoraLoader do: on a tiny Z-Image ComfyUI builds itself, the merged file's patches equal the
stack's on every weight, with ComfyUI's own slices of the fused attention.qkv; no "lora key not loaded"."""
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
from merge_core.cli import main  # noqa: E402
from zimage_synth import CONFIG, comfy_file, diffusers_file  # noqa: E402

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def zimage(comfy_inprocess):  # noqa: F811
    """ComfyUI's model of zimage_synth.CONFIG (its Lumina2 class, which Z-Image's is), weights zeroed; its key map."""
    return tiny_model(CONFIG, "Lumina2")


@pytest.mark.parametrize("method,bfl", [("concat", True), ("svd", True), ("concat", False)])
def test_comfyui_and_ai_toolkit_zimage_merge_applies_as_the_stack_in_comfyui(zimage, tmp_path, method, bfl):
    comfy_file(tmp_path / "c.safetensors", bfl=bfl)
    diffusers_file(tmp_path / "d.safetensors")
    out = tmp_path / "merged.safetensors"
    extra = ["--rank", "16"] if method == "svd" else []  # above every module's summed rank: exact
    assert main(["merge", str(tmp_path / "c.safetensors"), str(tmp_path / "d.safetensors"), "--method", method,
                 "--weights", "0.8", "-0.5", "--dtype", "fp32", "-o", str(out), *extra]) == 0
    _, not_loaded = load_lora_with_comfy(load_file(str(out)), zimage[1])
    assert not_loaded == []
    stacked = applied(zimage[0], [(tmp_path / "c.safetensors", 0.8), (tmp_path / "d.safetensors", -0.5)])
    merged = applied(zimage[0], [(out, 1.0)])
    assert len(stacked) == 7 and set(merged) == set(stacked)  # every weight either file patches
    for key, want in stacked.items():
        assert float((merged[key] - want).norm()) <= 1e-5 * float(want.norm()), key
