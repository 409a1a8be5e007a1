"""One model's LoRAs named two ways (Flux and SD3: kohya and diffusers; Z-Image: ComfyUI's `diffusion_model.` or kohya,
and AI-Toolkit's), merged, do in a real ComfyUI (0.3.75, in-process) what the two stacked in LoraLoader do: on a
tiny model ComfyUI builds itself (weights zeroed, so a patched weight is the ΔW ComfyUI applies), the merged
file's patches equal the stack's on every weight, with ComfyUI's own slices of the fused q|k|v / linear1
weights and its shift/scale swap of Flux's norm_out; no "lora key not loaded".  A Flux merge with block weights
puts each block at its strength."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import flux_synth  # noqa: E402
import sd3_synth  # noqa: E402
import zimage_synth  # noqa: E402
from comfy_host import load_lora_with_comfy  # noqa: E402
from comfy_host.fixtures import comfy_inprocess  # noqa: E402,F401
from comfy_host.tiny_models import applied, tiny_model  # noqa: E402
from merge_core.cli import main  # noqa: E402

pytestmark = pytest.mark.comfyui
# case -> (unet config, ComfyUI's model class, the two files' writers, weights either file patches)
CASES = {"flux": (flux_synth.CONFIG, "Flux", flux_synth.kohya_file, flux_synth.diffusers_file, 8),
         "sd3": (sd3_synth.CONFIG, "SD3", sd3_synth.kohya_file, sd3_synth.diffusers_file, 8),
         "zimage": (zimage_synth.CONFIG, "Lumina2", zimage_synth.comfy_file, zimage_synth.diffusers_file, 7),
         "zimage-kohya": (zimage_synth.CONFIG, "Lumina2", lambda path: zimage_synth.comfy_file(path, bfl=False),
                          zimage_synth.diffusers_file, 7)}


@pytest.fixture(scope="module")
def models(comfy_inprocess):  # noqa: F811
    """ComfyUI's tiny model of each config, built once: (ModelPatcher, key map) by model class."""
    built = {}

    def model(config: dict, model_class: str):
        if model_class not in built:
            built[model_class] = tiny_model(config, model_class)
        return built[model_class]
    return model


@pytest.mark.parametrize("case,method", [("flux", "concat"), ("flux", "svd"), ("sd3", "concat"), ("sd3", "svd"),
                                         ("zimage", "concat"), ("zimage", "svd"), ("zimage-kohya", "concat")])
def test_a_merge_of_loras_named_two_ways_applies_as_the_stack_in_comfyui(models, tmp_path, case, method):
    config, model_class, first, second, patched = CASES[case]
    patcher, key_map = models(config, model_class)
    first(tmp_path / "a.safetensors")
    second(tmp_path / "b.safetensors")
    out = tmp_path / "merged.safetensors"
    extra = ["--rank", "16"] if method == "svd" else []  # above every module's summed rank: exact
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--method", method,
                 "--weights", "0.8", "-0.5", "--dtype", "fp32", "-o", str(out), *extra]) == 0
    _, not_loaded = load_lora_with_comfy(load_file(str(out)), key_map)
    assert not_loaded == []
    stacked = applied(patcher, [(tmp_path / "a.safetensors", 0.8), (tmp_path / "b.safetensors", -0.5)])
    merged = applied(patcher, [(out, 1.0)])
    assert len(stacked) == patched and set(merged) == set(stacked)  # every weight either file patches
    for key, want in stacked.items():
        assert float((merged[key] - want).norm()) <= 1e-5 * float(want.norm()), key


def test_flux_block_weights_put_each_block_at_its_strength_in_comfyui(models, tmp_path):
    """A merge with Flux.1 block weights (58 values: BASE, D00-D18, S00-S37, or BLOCK=VALUE pairs) patches every
    weight of the tiny Flux with each file's own ΔW (as ComfyUI applies it alone) times its weight and its block's
    strength."""
    patcher, key_map = models(flux_synth.CONFIG, "Flux")
    flux_synth.kohya_file(tmp_path / "a.safetensors")
    flux_synth.diffusers_file(tmp_path / "b.safetensors")
    strengths = {"a": {"BASE": 0.5, "D00": 2.0, "S00": -1.0}, "b": {"BASE": 3.0, "D00": 0.25, "S00": 0.0}}
    values = [9.0] * 58  # blocks the tiny Flux lacks
    values[0], values[1], values[20] = (strengths["a"][k] for k in ("BASE", "D00", "S00"))
    vectors = [",".join(map(str, values)), "BASE=3, D=0.25, S=0"]  # b's by name
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--method", "concat",
                 "--weights", "0.8", "-0.5", "--block-weights", *vectors, "--dtype", "fp32", "-o", str(out)]) == 0
    _, not_loaded = load_lora_with_comfy(load_file(str(out)), key_map)
    assert not_loaded == []
    alone = {tag: applied(patcher, [(tmp_path / f"{tag}.safetensors", 1.0)]) for tag in "ab"}
    merged = applied(patcher, [(out, 1.0)])
    assert set(merged) == set(alone["a"]) | set(alone["b"])

    def block(key: str) -> str:
        return "D00" if ".double_blocks.0." in key else "S00" if ".single_blocks.0." in key else "BASE"

    for key, got in merged.items():
        want = sum(w * strengths[tag][block(key)] * alone[tag][key]
                   for tag, w in (("a", 0.8), ("b", -0.5)) if key in alone[tag])
        assert float((got - want).norm()) <= 1e-5 * max(float(want.norm()), 1e-12), key
