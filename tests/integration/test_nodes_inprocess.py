"""The pack's nodes in-process, against real ComfyUI 0.3.75 objects: MODEL/CLIP flows (Apply LoRA, Extract
from MODEL inputs), LORA_MODEL interop, the report picture, saving, and cancelling.

MODEL and CLIP are ComfyUI's real SDXL classes (comfy.model_base.SDXL in a ModelPatcher, comfy.sd.CLIP with
SDXLClipModel), built on the meta device: every key and shape is SDXL's, no memory is spent on weights.
Tests that need numbers materialise only the layers they touch (every other parameter is dropped from the
modules), so ComfyUI's own patch code runs on real tensors of real SDXL shapes.  A reduced UNet config was
the alternative; it would change the key names and shapes the pack relies on.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from merge_core.errors import MergeCoreError, UnsafePathError
from merge_core.keys.sdxl_table import sdxl_modules
from nodes_support import (CONV_NAME, MODULE_NAMES, NotLoadedLog, dense_delta, import_pack, loha_tensors,
                           lora_tensors, node, patched_weight, rel_err, sdxl_objects, specs, write)

pytestmark = pytest.mark.comfyui

SPECS = specs(MODULE_NAMES + (CONV_NAME,))
KEYS = {s.key for s in SPECS}


@pytest.fixture()
def comfy_dirs(tmp_path, monkeypatch):
    """ComfyUI's output, loras and checkpoints folders pointed at a temp folder for one test."""
    import_pack()
    import folder_paths

    dirs = {name: tmp_path / name for name in ("output", "loras", "checkpoints")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(dirs["output"]))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for name in ("loras", "checkpoints"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(dirs[name])], {".safetensors"}))
    return dirs


def load(name: str):
    return node("LoRArSVD_Load").load(name, "auto")["result"][0]


def module_delta(pack, name: str) -> torch.Tensor:
    module = pack.lora.modules[name]
    spec = sdxl_modules()[name]
    return dense_delta({f"{name}.{role}": t for role, t in module.tensors().items()}, name, spec.shape)


def test_pack_imports_like_comfyui():
    pack = import_pack()  # first: ComfyUI's folder goes ahead of the repo root on sys.path
    import merge_core
    import nodes as comfy_nodes

    from comfy_host import comfyui_dir

    ids = set(pack.NODE_CLASS_MAPPINGS)
    assert len(ids) == 14 and all(i.startswith("LoRArSVD_") for i in ids)
    assert not ids & set(comfy_nodes.NODE_CLASS_MAPPINGS)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == ids
    assert pack.WEB_DIRECTORY == "./js"
    # ComfyUI's top-level `nodes` is untouched; ours is the pack's subpackage; one merge_core
    assert comfy_nodes.__file__ == str(comfyui_dir() / "nodes.py")
    assert pack.nodes.__name__ == "custom_nodes/lora-rsvd-merge.nodes"
    assert merge_core.__file__.startswith(str(pack.__path__[0]))
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "LoRA rSVD Merge"
        assert callable(getattr(cls, cls.FUNCTION))


def test_saved_merge_loads_in_comfy_with_every_key(comfy_dirs):
    """A LoRA saved by the pack (every SDXL module incl. LoCon) goes through comfy.sd.load_lora_for_models on
    SDXL with zero "lora key not loaded" and one patch per module; Apply LoRA does the same."""
    table = list(sdxl_modules().values())
    write(comfy_dirs["loras"] / "full_a.safetensors", lora_tensors(table, rank=1, seed=1))
    write(comfy_dirs["loras"] / "full_b.safetensors", lora_tensors(table[::2], rank=2, seed=2))
    merged = node("LoRArSVD_MergeConventional").merge(
        "concat", 0.5, 0, 0.99, 4, 32, 0, "cpu", "error", "", lora_1=load("full_a.safetensors"), weight_1=1.0,
        lora_2=load("full_b.safetensors"), weight_2=0.5)["result"][0]
    path = node("LoRArSVD_Save").save(merged, "loras/full_merge", "fp16")["result"][0]
    assert path == "loras/full_merge_00001_.safetensors"

    import comfy.sd
    import comfy.utils

    model, clip = sdxl_objects()
    sd = comfy.utils.load_torch_file(str(comfy_dirs["output"] / path))
    with NotLoadedLog() as log:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
    assert log.keys == []
    assert len(new_model.patches) + len(new_clip.patcher.patches) == len(table) == 1052
    assert set(new_model.patches) | set(new_clip.patcher.patches) == {s.key for s in table}

    with NotLoadedLog() as log:
        m2, c2 = node("LoRArSVD_Apply").apply(model, clip, merged, 1.0, 1.0)
    assert log.keys == []
    assert len(m2.patches) + len(c2.patcher.patches) == 1052
    assert model.patches == {} and clip.patcher.patches == {}  # the inputs are not modified


def test_resized_lora_loads_in_comfy_with_every_key(comfy_dirs):
    """Resize LoRA on every SDXL module (LoCon included), rank 6 down to 2: saved, then loaded by
    comfy.sd.load_lora_for_models with zero "lora key not loaded", one patch per module, all at rank 2."""
    table = list(sdxl_modules().values())
    write(comfy_dirs["loras"] / "full_r6.safetensors", lora_tensors(table, rank=6, seed=3))
    resized = node("LoRArSVD_Resize").resize(load("full_r6.safetensors"), "svd", 2, 0.99, 4, 32, 0, "cpu",
                                             "error")["result"][0]
    path = node("LoRArSVD_Save").save(resized, "loras/resized", "fp16")["result"][0]

    import comfy.sd
    import comfy.utils

    model, clip = sdxl_objects()
    sd = comfy.utils.load_torch_file(str(comfy_dirs["output"] / path))
    assert {v.shape[0] for k, v in sd.items() if k.endswith(".lora_down.weight")} == {2}
    with NotLoadedLog() as log:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
    assert log.keys == []
    assert set(new_model.patches) | set(new_clip.patcher.patches) == {s.key for s in table}


def test_resize_bakes_block_weights_in(comfy_dirs):
    """Resize LoRA with block weights by name: the IN blocks' modules drop out (a zero result), OUT00-OUT02's come
    back at half strength, the rest as they were (rank 6 kept whole)."""
    table = [s for s in sdxl_modules().values() if s.block in ("IN04", "IN07", "MID", "OUT01", "OUT05")][::7]
    write(comfy_dirs["loras"] / "r6.safetensors", lora_tensors(table, rank=6, seed=4))
    source = load("r6.safetensors")
    resized = node("LoRArSVD_Resize").resize(source, "svd", 6, 0.99, 4, 32, 0, "cpu", "error",
                                             block_weights="IN=0, OUT00-OUT02=0.5\n")["result"][0]
    assert set(resized.lora.modules) == {s.name for s in table if not s.block.startswith("IN")}
    for s in table:
        if not s.block.startswith("IN"):
            scale = 0.5 if s.block == "OUT01" else 1.0
            assert rel_err(module_delta(resized, s.name), scale * module_delta(source, s.name)) < 1e-5, s.name


def test_load_info_names_what_needs_care(comfy_dirs):
    """The Load LoRA node's info output: the file's description, and an alpha 0 / negative alpha named as inspect
    names it."""
    tensors = lora_tensors(specs(), rank=2, seed=4)
    names = [s.name for s in specs()]
    tensors[f"{names[0]}.alpha"], tensors[f"{names[1]}.alpha"] = torch.tensor(0.0), torch.tensor(-2.0)
    write(comfy_dirs["loras"] / "odd_alpha.safetensors", tensors)
    result = node("LoRArSVD_Load").load("odd_alpha.safetensors", "auto")
    info = result["result"][1]
    assert result["ui"]["text"] == [info]
    lines = info.splitlines()
    assert lines[0] == "odd_alpha.safetensors" and lines[1] == "format: sdxl names, architecture sdxl"
    assert f"alpha 0: 1 module has alpha 0, e.g. '{names[0]}'" in info
    assert f"alpha < 0: 1 module has a negative alpha, e.g. '{names[1]}'" in info


def test_apply_patches_what_loraloader_would(comfy_dirs):
    tensors = lora_tensors(SPECS, rank=4, seed=3)
    write(comfy_dirs["loras"] / "a.safetensors", tensors)
    model, clip = sdxl_objects(keep=KEYS, seed=4)
    new_model, new_clip = node("LoRArSVD_Apply").apply(model, clip, load("a.safetensors"), 0.7, -0.4)
    for s in SPECS:
        unet = s.group == "unet"
        patcher = new_model if unet else new_clip.patcher
        clean = patched_weight(model if unet else clip.patcher, s.key)
        expected = clean + (0.7 if unet else -0.4) * dense_delta(tensors, s.name, s.shape)
        assert rel_err(patched_weight(patcher, s.key), expected) < 1e-6, s.name
    assert node("LoRArSVD_Apply").apply(model, clip, load("a.safetensors"), 0.0, 0.0) == (model, clip)


def test_extract_from_two_loaded_models():
    """tuned is a separate model (as from a second Load Checkpoint): ΔW = tuned − base, rank 4, recovered."""
    g = torch.Generator().manual_seed(5)
    base_w = {s.key: torch.randn(*s.shape, generator=g) * 0.02 for s in SPECS}
    delta = {s.key: (torch.randn(s.shape[0], 4, generator=g) @ torch.randn(4, s.matrix_shape[1], generator=g)
                     * 0.01).reshape(s.shape) for s in SPECS}
    base_model, base_clip = sdxl_objects(keep=KEYS, weights=base_w)
    tuned_model, tuned_clip = sdxl_objects(keep=KEYS, weights={k: base_w[k] + delta[k] for k in KEYS})
    pack = node("LoRArSVD_ExtractModels").extract(
        base_model, tuned_model, "cpu", base_clip, tuned_clip, rank=8, energy=0.99, min_rank=4, max_rank=32,
        conv_rank=0, diff_only=False, min_diff=0.0, seed=0)["result"][0]
    assert pack.lora.arch == "sdxl" and set(pack.lora.modules) == {s.name for s in SPECS}
    for s in SPECS:
        assert rel_err(module_delta(pack, s.name), delta[s.key]) < 1e-4, s.name
    assert pack.report is not None and len(pack.report.modules) == len(SPECS)

    only_unet = node("LoRArSVD_ExtractModels").extract(
        base_model, tuned_model, "cpu", rank=8, energy=0.99, min_rank=4, max_rank=32, conv_rank=0,
        diff_only=False, min_diff=0.0, seed=0)["result"][0]
    assert set(only_unet.lora.modules) == {s.name for s in SPECS if s.group == "unet"}
    with pytest.raises(MergeCoreError, match="both base_clip and tuned_clip"):
        node("LoRArSVD_ExtractModels").extract(base_model, tuned_model, "cpu", base_clip, None, rank=8,
                                               energy=0.99, min_rank=4, max_rank=32, conv_rank=0,
                                               diff_only=False, min_diff=0.0, seed=0)

    full_bytes = sum(2 * t.numel() for m in pack.lora.modules.values() for k, t in m.tensors().items() if k != "alpha")
    fitted = node("LoRArSVD_ExtractModels").extract(
        base_model, tuned_model, "cpu", base_clip, tuned_clip, rank=8, energy=0.99, min_rank=1, max_rank=4,
        conv_rank=0, diff_only=False, min_diff=0.0, seed=0, target_size_mb=0.6 * full_bytes / 2**20)
    budget = fitted["result"][0].report.extra["size_budget"]
    assert budget["file_bytes"] <= budget["target_bytes"] and budget["max_rank"] <= 4
    assert "size budget" in fitted["ui"]["text"][0]


def test_extract_from_lora_patched_clone_reads_clean_base(comfy_dirs):
    """tuned = base patched by LoraLoader-style patches; even with the clone's patches written into the
    shared weights, the base is read clean (get_key_patches backup) and ΔW = 0.8·ΔW_lora comes back."""
    tensors = lora_tensors(SPECS, rank=4, seed=6)
    write(comfy_dirs["loras"] / "a.safetensors", tensors)
    base_model, base_clip = sdxl_objects(keep=KEYS, seed=7)
    tuned_model, tuned_clip = node("LoRArSVD_Apply").apply(base_model, base_clip, load("a.safetensors"), 0.8, 0.8)
    for patcher in (tuned_model, tuned_clip.patcher):
        for key in patcher.patches:
            patcher.patch_weight_to_device(key)  # as when the tuned clone is loaded for sampling
    try:
        pack = node("LoRArSVD_ExtractModels").extract(
            base_model, tuned_model, "cpu", base_clip, tuned_clip, rank=4, energy=0.99, min_rank=4,
            max_rank=32, conv_rank=0, diff_only=False, min_diff=0.0, seed=0)["result"][0]
    finally:
        tuned_model.unpatch_model()
        tuned_clip.patcher.unpatch_model()
    for s in SPECS:
        assert rel_err(module_delta(pack, s.name), 0.8 * dense_delta(tensors, s.name, s.shape)) < 1e-4, s.name


def test_lora_model_round_trip_and_comfy_loader(comfy_dirs):
    from comfy_extras.nodes_train import LoraModelLoader

    tensors = lora_tensors(SPECS, rank=4, seed=8)
    write(comfy_dirs["loras"] / "a.safetensors", tensors)
    pack = load("a.safetensors")
    lora_model, info = node("LoRArSVD_ToLoraModel").convert(pack)
    unet = [s for s in SPECS if s.group == "unet"]
    assert "2 text-encoder modules left out" in info
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora_model} == \
        {s.key[: -len(".weight")] for s in unet}
    assert all(t.dtype == torch.float32 for t in lora_model.values())

    model, _ = sdxl_objects()
    with NotLoadedLog() as log:
        patched = LoraModelLoader.execute(model, lora_model, 1.0).result[0]
    assert log.keys == [] and set(patched.patches) == {s.key for s in unet}

    back, _ = node("LoRArSVD_FromLoraModel").convert(lora_model)
    assert back.lora.arch == "sdxl" and set(back.lora.modules) == {s.name for s in unet}
    for s in unet:
        assert rel_err(module_delta(back, s.name), dense_delta(tensors, s.name, s.shape)) < 1e-6


def test_lora_model_from_training_layout():
    """What TrainLoraNode makes for SDXL: conv LoRA factors flattened to 2-D, plus norm .diff, bias-only and
    time-embedding adapters that no SDXL LoRA file names (left out, counted)."""
    g = torch.Generator().manual_seed(9)
    conv = sdxl_modules()[CONV_NAME]
    prefix = conv.key[: -len(".weight")]
    up, down = torch.randn(320, 4, generator=g), torch.randn(4, 320 * 9, generator=g)
    lora_model = {
        f"{prefix}.lora_up.weight": torch.nn.Parameter(up), f"{prefix}.lora_down.weight": down,
        f"{prefix}.alpha": torch.tensor(1.0),
        "diffusion_model.input_blocks.4.1.norm.diff": torch.randn(640, generator=g),
        "diffusion_model.time_embed.0.lora_up.weight": torch.randn(1280, 4, generator=g),
        "diffusion_model.time_embed.0.lora_down.weight": torch.randn(4, 320, generator=g),
        "diffusion_model.time_embed.0.alpha": torch.tensor(1.0),
    }
    pack, info = node("LoRArSVD_FromLoraModel").convert(lora_model)
    assert pack.lora.arch == "sdxl" and list(pack.lora.modules) == [CONV_NAME]
    assert "left out: 4 tensors" in info
    module = pack.lora.modules[CONV_NAME]
    assert module.weight_shape == (320, 320, 3, 3)
    assert rel_err(module.delta(), (0.25 * up @ down).reshape(320, 320, 3, 3)) < 1e-6


def test_report_text_and_image(comfy_dirs):
    write(comfy_dirs["loras"] / "a.safetensors", lora_tensors(SPECS, rank=4, seed=10))
    write(comfy_dirs["loras"] / "b.safetensors", loha_tensors(specs(MODULE_NAMES[:4]), rank=2, seed=11))
    merged = node("LoRArSVD_Merge").merge(0, 0.95, 2, 16, 0, "cpu", "error", lora_1=load("a.safetensors"),
                                          weight_1=1.0, lora_2=load("b.safetensors"), weight_2=0.5)["result"][0]
    out = node("LoRArSVD_Report").report(merged)
    text, image = out["result"]
    assert image.shape == (1, 560, 1024, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    for line in ("IN04", "MID", "OUT05", "BASE", MODULE_NAMES[0]):
        assert line in text
    assert out["ui"]["text"] == [text]
    text2, image2 = node("LoRArSVD_Report").report(load("a.safetensors"))["result"]
    assert "loaded from a file" in text2 and image2.shape == (1, 560, 1024, 3)


def test_flux_block_weights_and_report_by_flux_block(comfy_dirs):
    """The merge node takes a Flux.1 block-weight line per input; the report groups Flux modules by block."""
    import flux_synth

    kohya = flux_synth.kohya_file(comfy_dirs["loras"] / "a.safetensors")
    values = [1.0] * 58
    values[1], values[20] = 0.0, 0.5  # D00: the double block's modules drop out; S00 at half strength
    merged = node("LoRArSVD_Merge").merge(0, 1.0, 1, 64, 0, "cpu", "error", block_weights=",".join(map(str, values)),
                                          lora_1=load("a.safetensors"), weight_1=1.0)["result"][0]
    assert not any("double_blocks" in name for name in merged.lora.modules)
    single = "lora_unet_single_blocks_0_linear1"
    assert rel_err(merged.lora.modules[single].delta().double(), 0.5 * kohya[single]) < 1e-5
    text, image = node("LoRArSVD_Report").report(merged)["result"]
    rows = {line.split()[0]: tuple(line.split()[1:3]) for line in text.split("\n\n")[1].splitlines()[1:]}
    assert rows == {"BASE": ("2", "4.0"), "D00": ("2", "0.0"), "S00": ("2", "4.0")}  # modules, mean rank
    assert image.shape == (1, 560, 1024, 3)


def test_rsvd_merge_node_fits_a_size_budget(comfy_dirs):
    write(comfy_dirs["loras"] / "a.safetensors", lora_tensors(SPECS, rank=8, seed=20))
    write(comfy_dirs["loras"] / "b.safetensors", lora_tensors(SPECS, rank=8, seed=21))
    args = dict(lora_1=load("a.safetensors"), weight_1=1.0, lora_2=load("b.safetensors"), weight_2=1.0)
    full = node("LoRArSVD_Merge").merge(0, 1.0, 1, 16, 0, "cpu", "error", **args)["result"][0]
    full_path = node("LoRArSVD_Save").save(full, "loras/full", "fp16")["result"][0]
    target_mb = 0.6 * (comfy_dirs["output"] / full_path).stat().st_size / 2**20
    fitted = node("LoRArSVD_Merge").merge(0, 1.0, 1, 16, 0, "cpu", "error", target_size_mb=target_mb, **args)
    path = node("LoRArSVD_Save").save(fitted["result"][0], "loras/fitted", "fp16")["result"][0]
    assert (comfy_dirs["output"] / path).stat().st_size <= target_mb * 2**20
    assert fitted["result"][0].report.extra["size_budget"]["energy_kept"] > 0.5
    assert "size budget" in fitted["ui"]["text"][0] and "% of the energy kept" in fitted["ui"]["text"][0]


def test_save_numbers_files_and_refuses_escapes(comfy_dirs):
    write(comfy_dirs["loras"] / "a.safetensors", lora_tensors(SPECS[:2], rank=2, seed=12))
    pack = load("a.safetensors")
    save = node("LoRArSVD_Save")
    first = save.save(pack, "loras/mine", "fp32", title="Mine")["result"][0]
    before = (comfy_dirs["output"] / first).read_bytes()
    second = save.save(pack, "loras/mine", "fp16")["result"][0]
    assert (first, second) == ("loras/mine_00001_.safetensors", "loras/mine_00002_.safetensors")
    assert (comfy_dirs["output"] / first).read_bytes() == before
    assert load_file(str(comfy_dirs["output"] / second))[f"{SPECS[0].name}.lora_up.weight"].dtype == torch.float16
    for bad in ("../escape", "loras/../../escape", str(comfy_dirs["loras"] / "abs")):
        with pytest.raises(UnsafePathError):
            save.save(pack, bad, "fp16")
    assert sorted(p.name for p in comfy_dirs["output"].rglob("*") if p.is_file()) == [
        "mine_00001_.safetensors", "mine_00002_.safetensors"]
    assert not list(comfy_dirs["loras"].glob("abs*"))


def test_cancel_during_bake_leaves_no_file(comfy_dirs, monkeypatch):
    """Interrupting (ComfyUI's cancel) while a bake streams stops it and leaves no file, partial or temp."""
    import comfy.model_management
    import comfy.utils
    from nodes_support import checkpoint_pair

    base, _ = checkpoint_pair(specs(MODULE_NAMES[:3]), rank=2, seed=13)
    write(comfy_dirs["checkpoints"] / "base.safetensors", base)
    write(comfy_dirs["loras"] / "a.safetensors", lora_tensors(specs(MODULE_NAMES[:3]), rank=2, seed=14))
    original = comfy.utils.ProgressBar.update_absolute

    def cancel_after_first(bar, value, total=None, preview=None):
        original(bar, value, total, preview)
        comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", cancel_after_first)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        node("LoRArSVD_Bake").bake("base.safetensors", 1.0, "checkpoints/baked", "same", "cpu",
                                   lora_name="a.safetensors")
    assert [p for p in comfy_dirs["output"].rglob("*") if p.is_file()] == []
