"""Smoke tests of the real-ComfyUI harness (tests/comfy_host) and the SDXL module table.

* every kohya name in merge_core/data/sdxl_modules.json is a key of ComfyUI's own
  SDXL LoRA key map and maps to the table's ``key``;
* a hand-made kohya SDXL LoRA/LoCon covering the whole table goes through
  ComfyUI's ``load_lora`` with no "lora key not loaded" and one patch per module,
  and the patch ComfyUI applies is ``strength * alpha / rank * up @ down``;
* a headless ComfyUI server starts with this repo as a custom node pack, lists
  ``LoraLoader``, does not report IMPORT FAILED for the pack, sees our loras
  folder, runs a trivial graph and refuses an invalid one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from comfy_host import ComfyServerError, load_lora_with_comfy  # noqa: E402
from comfy_host.fixtures import comfy_inprocess, comfy_server, sdxl_key_map, sdxl_modules  # noqa: E402,F401

pytestmark = pytest.mark.comfyui

RANK = 2


def _factors(module: dict, gen):
    import torch

    shape = module["shape"]
    out_dim, in_dim = shape[0], shape[1]
    if module["kind"] == "conv":
        kh, kw = shape[2], shape[3]
        down = torch.randn(RANK, in_dim, kh, kw, generator=gen) * 0.1
        up = torch.randn(out_dim, RANK, 1, 1, generator=gen) * 0.1
    else:
        down = torch.randn(RANK, in_dim, generator=gen) * 0.1
        up = torch.randn(out_dim, RANK, generator=gen) * 0.1
    return up, down


def _kohya_state_dict(modules: list[dict], seed: int = 0) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, m in enumerate(modules):
        up, down = _factors(m, gen)
        sd[f"{m['name']}.lora_up.weight"] = up
        sd[f"{m['name']}.lora_down.weight"] = down
        sd[f"{m['name']}.alpha"] = torch.tensor(float(1 + i % 4))
    return sd


def test_table_counts(sdxl_modules):
    modules = sdxl_modules["modules"]
    plain = [m for m in modules if not m["locon"]]
    assert sum(1 for m in plain if m["group"] == "unet") == 722
    assert sum(1 for m in plain if m["group"] == "te1") == 72
    assert sum(1 for m in plain if m["group"] == "te2") == 192
    assert len(plain) == 986
    locon = [m for m in modules if m["locon"]]
    assert locon and all(m["group"] == "unet" for m in locon)
    assert sdxl_modules["counts"]["locon_total"] == len(modules)
    assert len({m["name"] for m in modules}) == len(modules)


def test_key_map_has_every_table_name(sdxl_key_map, sdxl_modules):
    modules = sdxl_modules["modules"]
    missing = [m["name"] for m in modules if m["name"] not in sdxl_key_map]
    assert not missing, missing[:10]
    wrong = [(m["name"], sdxl_key_map[m["name"]], m["key"]) for m in modules
             if sdxl_key_map[m["name"]] != m["key"]]
    assert not wrong, wrong[:10]
    # The diffusers-path alias ComfyUI accepts for UNet modules lands on the same key.
    for m in modules:
        if m["group"] == "unet":
            assert sdxl_key_map["lora_unet_" + m["diffusers"].replace(".", "_")] == m["key"], m["name"]


def test_kohya_locon_loads_with_no_missing_keys(comfy_inprocess, sdxl_modules):
    import torch
    import comfy.lora
    from comfy.weight_adapter import LoRAAdapter

    modules = sdxl_modules["modules"]
    sd = _kohya_state_dict(modules)
    patches, not_loaded = load_lora_with_comfy(sd)
    assert not_loaded == []
    assert len(patches) == len(modules)
    assert set(patches) == {m["key"] for m in modules}
    assert all(isinstance(p, LoRAAdapter) for p in patches.values())

    # What ComfyUI applies at strength s: W + s * (alpha / rank) * up @ down.
    by_name = {m["name"]: m for m in modules}
    strength = 0.75
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_input_blocks_4_0_in_layers_2",
                 "lora_unet_input_blocks_4_0_skip_connection",
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1"):
        m = by_name[name]
        up = sd[f"{name}.lora_up.weight"]
        down = sd[f"{name}.lora_down.weight"]
        alpha = sd[f"{name}.alpha"].item()
        expected = (up.flatten(1) @ down.flatten(1)).reshape(m["shape"]) * (strength * alpha / RANK)
        weight = torch.zeros(m["shape"])
        got = comfy.lora.calculate_weight([(strength, patches[m["key"]], 1.0, None, None)], weight, m["key"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_unknown_key_is_reported(comfy_inprocess):
    import torch

    sd = {
        "lora_unet_no_such_module.lora_up.weight": torch.zeros(4, 1),
        "lora_unet_no_such_module.lora_down.weight": torch.zeros(1, 4),
    }
    patches, not_loaded = load_lora_with_comfy(sd)
    assert patches == {}
    assert sorted(not_loaded) == sorted(sd)


def test_server_smoke(comfy_server):
    import safetensors.torch
    import torch

    srv = comfy_server
    assert not srv.import_failed(), "ComfyUI could not import the pack:\n" + srv.pack_import_error()
    assert srv.pack_loaded(), srv.log_tail()

    info = srv.object_info()
    assert "LoraLoader" in info
    assert "SaveImage" in info

    # The loras folder from our extra_model_paths yaml is what LoraLoader lists.
    safetensors.torch.save_file(
        {"lora_unet_x.lora_up.weight": torch.zeros(2, 1), "lora_unet_x.lora_down.weight": torch.zeros(1, 2)},
        str(srv.loras_dir / "smoke_test_lora.safetensors"))
    lora_names = srv.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "smoke_test_lora.safetensors" in lora_names

    entry = srv.run({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "smoke/img"}},
    }, timeout=60)
    assert entry["status"]["status_str"] == "success"
    images = entry["outputs"]["2"]["images"]
    assert (srv.output_dir / images[0]["subfolder"] / images[0]["filename"]).is_file()

    with pytest.raises(ComfyServerError):
        srv.submit({"1": {"class_type": "LoraLoaderModelOnly",
                          "inputs": {"model": ["9", 0], "lora_name": "nope.safetensors", "strength_model": 1.0}}})
