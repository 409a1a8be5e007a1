"""Safe I/O: atomic writes that never overwrite, paths that stay in their folder, metadata and recipe."""
import json

import pytest
import torch
from safetensors import safe_open

from merge_core.errors import OutputExistsError, UnsafePathError
from merge_core.files import RECIPE_KEY, atomic_write, inside, make_recipe
from merge_core.lora_file import save_lora
from synth import sdxl_lora, sdxl_specs


def test_atomic_write_refuses_to_overwrite_and_keeps_the_original(tmp_path):
    p = tmp_path / "out.bin"
    p.write_text("original")
    with pytest.raises(OutputExistsError, match="not overwriting"):
        atomic_write(p, lambda tmp: tmp.write_text("new"))
    assert p.read_text() == "original"
    atomic_write(p, lambda tmp: tmp.write_text("new"), overwrite=True)
    assert p.read_text() == "new"


def test_failed_write_leaves_no_file_and_no_temp(tmp_path):
    def boom(tmp):
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.safetensors", boom)
    assert list(tmp_path.iterdir()) == []


def test_inside_keeps_paths_in_their_folder(tmp_path):
    assert inside(tmp_path, "loras/a.safetensors") == (tmp_path / "loras/a.safetensors").resolve()
    for bad in ("../x.safetensors", "/etc/passwd", "loras/../../x"):
        with pytest.raises(UnsafePathError):
            inside(tmp_path, bad)


def test_written_lora_has_kohya_modelspec_metadata_and_recipe(tmp_path):
    specs = sdxl_specs(per_group=2)
    mods = sdxl_lora(specs, rank=4)
    src = tmp_path / "in.safetensors"
    save_lora(mods, src)
    recipe = make_recipe("merge", [src], {"method": "rsvd"})
    mods[specs[0].name] = sdxl_lora(specs[:1], rank=8)[specs[0].name]
    out = save_lora(mods, tmp_path / "out.safetensors", recipe=recipe)
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
        assert fh.get_tensor(f"{specs[1].name}.lora_up.weight").dtype == torch.float16
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "Dynamic"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.merged_from"] == "in.safetensors"
    rec = json.loads(meta[RECIPE_KEY])
    assert rec["operation"] == "merge" and len(rec["inputs"][0]["sha256"]) == 64 and rec["version"]
