"""Safe I/O: atomic writes that never overwrite, paths that stay in their folder, metadata and recipe."""
import errno
import json
import os

import pytest
import torch
from safetensors import safe_open

from merge_core.errors import NonFiniteError, OutputExistsError, OutputWriteError, UnsafePathError
from merge_core.files import RECIPE_KEY, atomic_folder, atomic_write, inside, make_recipe
from merge_core.files.metadata import carried_metadata, lora_metadata
from merge_core.files.narrow import narrowed
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


def test_a_full_disk_is_one_line_and_changes_nothing(tmp_path):
    p = tmp_path / "out.safetensors"
    p.write_text("original")

    def full(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write on a full disk raises it

    with pytest.raises(OutputWriteError, match=r"cannot write .*out\.safetensors: No space left.*Nothing was changed"):
        atomic_write(p, full, overwrite=True)
    assert p.read_text() == "original" and [f.name for f in tmp_path.iterdir()] == ["out.safetensors"]


def test_a_refused_replace_is_one_line_and_the_old_file_stays(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.safetensors"
    p.write_text("original")

    def refused(src, dst):  # what Windows raises when dst is open in this or another program
        raise PermissionError(errno.EACCES, "Access is denied", str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OutputWriteError, match="cannot write .*ckpt.safetensors"):
        atomic_write(p, lambda tmp: tmp.write_text("new"), overwrite=True)
    assert p.read_text() == "original" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("below", ["out.safetensors", "sub/out.safetensors"])
def test_a_file_where_the_output_folder_should_be_is_one_line(tmp_path, below):
    blocker = tmp_path / "a.safetensors"
    blocker.write_text("an input")
    called = []
    with pytest.raises(OutputWriteError, match=r"cannot write .*: a folder on its path is a file\. Nothing was"):
        atomic_write(blocker / below, called.append)
    assert not called and blocker.read_text() == "an input" and len(list(tmp_path.iterdir())) == 1


def test_errors_on_other_files_are_not_called_write_errors(tmp_path):
    """An input that cannot be opened inside the write callback is the input's error, not the output's."""
    def reads_input(tmp):
        open(tmp_path / "missing_input.safetensors", "rb")

    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "out.safetensors", reads_input)

    def denied_input(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "in.safetensors"))

    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "out.safetensors", denied_input)

    def unnamed_denial(tmp):  # no file name: only the errors a write() raises (full disk, quota, size) are ours
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "out.safetensors", unnamed_denial)
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_replaces_only_once_the_new_folder_is_whole(tmp_path, monkeypatch):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        atomic_folder(d, lambda tmp: (tmp / "new.txt").write_text("new"))

    def fails(tmp):
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_folder(d, fails, overwrite=True)
    assert [f.name for f in tmp_path.iterdir()] == ["adapter"] and (d / "old.txt").read_text() == "old"
    real = os.rename

    def second_rename_fails(src, dst):  # the old folder moved aside, then the new one cannot move in
        if str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "I/O error", str(src), None, str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="I/O error"):
        atomic_folder(d, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True)
    assert [f.name for f in tmp_path.iterdir()] == ["adapter"] and (d / "old.txt").read_text() == "old"
    monkeypatch.setattr(os, "rename", real)
    atomic_folder(d, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True)
    assert [f.name for f in d.iterdir()] == ["new.txt"] and [f.name for f in tmp_path.iterdir()] == ["adapter"]


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


def test_saved_lora_is_written_module_by_module_and_holds_every_tensor(tmp_path, monkeypatch):
    """save_lora streams: each module is cast and written on its own (memory holds one module's file tensors,
    not the whole state dict plus a serialised copy), and the file holds exactly what state_dict_of gives."""
    import merge_core.lora_file as lora_file
    from merge_core.keys.suffixes import KOHYA

    mods = sdxl_lora(sdxl_specs(per_group=2, locon=True), rank=4)
    expected = lora_file.state_dict_of(mods, KOHYA, torch.float16)
    sizes = []
    real = lora_file.state_dict_of
    monkeypatch.setattr(lora_file, "state_dict_of", lambda m, *a, **k: sizes.append(len(m)) or real(m, *a, **k))
    out = save_lora(mods, tmp_path / "out.safetensors")
    assert sizes == [1] * len(mods)
    with safe_open(str(out), "pt") as fh:
        assert sorted(fh.keys()) == sorted(expected)
        for key, tensor in expected.items():
            got = fh.get_tensor(key)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        assert fh.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_carried_metadata_sums_tags_joins_phrases_and_skips_damaged_json():
    got = carried_metadata([
        {"ss_tag_frequency": '{"1_a": {"x": 2}}', "modelspec.trigger_phrase": "cat ears", "ss_seed": "1"},
        {"ss_tag_frequency": "{not json", "modelspec.trigger_phrase": " cat ears "},
        {"ss_tag_frequency": '{"1_a": {"x": 3, "y": 1}}', "modelspec.trigger_phrase": "sks"},
        {},
    ])
    assert json.loads(got.pop("ss_tag_frequency")) == {"1_a": {"x": 5, "y": 1}}
    assert got == {"modelspec.trigger_phrase": "cat ears, sks"}
    assert carried_metadata([{}, {"ss_seed": "1"}]) == {}


def test_the_base_model_is_kept_when_the_inputs_agree_and_the_form_follows_the_file(tmp_path):
    """A Flux LoRA's ss_base_model_version / modelspec.architecture / .implementation (what sd-scripts writes)
    survive a merge of such files; any disagreement or absence drops the key; the architecture's form suffix is
    the written file's (a LoKr is `lycoris`); SDXL's keys are always written anew."""
    flux = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux"}
    assert carried_metadata([flux, dict(flux)]) == flux
    assert carried_metadata([flux, {**flux, "ss_base_model_version": "flux1-schnell"}, flux]) == {
        k: v for k, v in flux.items() if k != "ss_base_model_version"}
    assert carried_metadata([flux, {}]) == {}
    lokr = lora_metadata({"lokr"}, [4], [4.0], "other", carried=carried_metadata([flux]))
    assert (lokr["modelspec.architecture"], lokr["ss_base_model_version"]) == ("flux-1-dev/lycoris", "flux1")
    assert lokr["modelspec.implementation"] == flux["modelspec.implementation"]
    assert lora_metadata({"lora"}, [4], [4.0], "other")["modelspec.implementation"] == "peft"
    sdxl = lora_metadata({"lora"}, [4], [4.0], "sdxl", carried=carried_metadata([flux]))
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sdxl["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_pickle_output_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """torch.save is given a Python file, so the disk's ENOSPC reaches the one-line write error."""
    import builtins

    from merge_core import lora_file
    from merge_core.adapters import LoRA

    monkeypatch.setattr(lora_file, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    module = LoRA(torch.ones(4, 2), torch.ones(2, 4), 2.0)
    with pytest.raises(OutputWriteError, match=r"cannot write .*m\.pt: No space left on device\. Nothing was changed"):
        lora_file.save_lora({"lora_unet_x": module}, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype, fits, overflows", [(torch.float16, 65519.0, 65520.0),
                                                    (torch.bfloat16, 3.3961e38, 3.3962e38)])
def test_narrowing_refuses_exactly_the_finite_values_that_would_become_inf(dtype, fits, overflows):
    for sign in (1, -1):
        ok = torch.tensor([0.5, sign * fits])
        assert torch.isfinite(narrowed(ok, dtype, "'k'")).all() and torch.isfinite(ok.to(dtype)).all()
        bad = torch.tensor([0.5, sign * overflows])
        assert not torch.isfinite(bad.to(dtype)).all()
        with pytest.raises(NonFiniteError, match=r"^'k' holds values up to .*, beyond .*; nothing was written$"):
            narrowed(bad, dtype, "'k'")
    special = torch.tensor([float("nan"), float("inf"), 1.0])  # not the writer's to refuse: inputs are checked
    assert narrowed(special, dtype, "'k'").isinf().sum() == 1
    assert narrowed(torch.tensor([1e30]), torch.float32, "'k'").item() == pytest.approx(1e30)  # no narrowing


def test_an_output_that_is_an_input_is_refused_where_open_files_cannot_be_replaced(tmp_path, monkeypatch):
    """Any spelling of the same file counts; sources that are not files (tensors in memory, folders) do not."""
    import merge_core.files.atomic as atomic
    from merge_core.files import refuse_existing

    (tmp_path / "sub").mkdir()
    out, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    out.write_bytes(b"x")
    other.write_bytes(b"y")
    inputs = [{"w": torch.zeros(1)}, tmp_path / "sub", str(other)]
    monkeypatch.setattr(atomic, "OPEN_FILES_LOCKED", True)
    refuse_existing(out, True, inputs)
    refuse_existing(tmp_path / "new.safetensors", True, [tmp_path / "new.safetensors"])  # not there yet: nothing open
    with pytest.raises(OutputWriteError, match="it is an input"):
        refuse_existing(out, True, [*inputs, tmp_path / "sub" / ".." / "a.safetensors"])
    monkeypatch.setattr(atomic, "OPEN_FILES_LOCKED", False)
    refuse_existing(out, True, [out])
