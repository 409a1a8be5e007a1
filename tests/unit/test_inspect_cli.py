"""`python -m merge_core inspect`: a useful description of good files, one clear line and a non-zero exit
for bad ones — including a pickle that would run code (and the proof that it did not)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from merge_core.cli import main

from merge_core.lora_file import save_lora
from synth import sdxl_lora, sdxl_specs

ROOT = Path(__file__).resolve().parents[2]


def subprocess_cli(*args):
    return subprocess.run([sys.executable, "-m", "merge_core", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def cli(capsys):
    """The CLI in-process (fast); exit code, stdout and stderr like a subprocess."""
    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def assert_one_line_error(res, needle):
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def test_inspect_describes_an_sdxl_lora(tmp_path, cli):
    save_lora(sdxl_lora(sdxl_specs(per_group=3, locon=True), rank=4), tmp_path / "a.safetensors")
    res = cli("inspect", tmp_path / "a.safetensors")
    assert res.returncode == 0, res.stderr
    assert "sdxl names, architecture sdxl" in res.stdout and "unet: 6" in res.stdout
    assert "alpha 0:" not in res.stdout and "alpha < 0:" not in res.stdout
    info = json.loads(cli("inspect", tmp_path / "a.safetensors", "--json").stdout)
    assert info["modules"] == 12 and info["parts"] == {"unet": 6, "te1": 3, "te2": 3}
    assert info["ranks"] == {"4": 12} and info["dtypes"] == {"float16": 24}
    # the LoCon convs of input_blocks.1 are block IN01, which the 12-value block weights leave out
    assert info["blocks"] == {"model": "SDXL", "held": ["BASE", "IN01", "IN04"]}
    assert ("blocks:        SDXL BASE, IN01, IN04; LoCon blocks too: 12-value block weights set those to 0, use 20 "
            "values or names") in res.stdout


def test_inspect_names_modules_holding_nan_or_inf(tmp_path, cli):
    modules = sdxl_lora(sdxl_specs(per_group=2), rank=4)
    names = list(modules)
    modules[names[1]].up[0, 0] = float("nan")
    modules[names[3]].down[1, 2] = float("-inf")
    save_lora(modules, tmp_path / "a.safetensors")
    res = cli("inspect", tmp_path / "a.safetensors")
    assert res.returncode == 0, res.stderr
    assert f"NaN/inf:       2 modules hold NaN or infinite values, e.g. '{names[1]}'" in res.stdout
    info = json.loads(cli("inspect", tmp_path / "a.safetensors", "--json").stdout)
    assert info["non_finite_modules"] == [names[1], names[3]]
    res = cli("inspect", tmp_path / "a.safetensors", "--ranks")  # the resize table is skipped, not an error
    assert res.returncode == 0 and "resize:        not computed: the file holds NaN or infinite values" in res.stdout


def test_inspect_flags_alpha_zero_and_negative(tmp_path, cli):
    """α/r scales ΔW in ComfyUI: α = 0 silences a module, α < 0 flips it; both are named, neither refused."""
    modules = sdxl_lora(sdxl_specs(per_group=2), rank=4)
    names = list(modules)
    modules[names[0]].alpha, modules[names[2]].alpha, modules[names[4]].alpha = 0.0, -4.0, -1.0
    save_lora(modules, tmp_path / "a.safetensors")
    res = cli("inspect", tmp_path / "a.safetensors")
    assert res.returncode == 0, res.stderr
    assert (f"alpha 0:       1 module has alpha 0, e.g. '{names[0]}': ComfyUI, A1111 and merges scale by α/r = 0, "
            "so they change nothing") in res.stdout
    assert f"alpha < 0:     2 modules have a negative alpha, e.g. '{names[2]}'" in res.stdout
    info = json.loads(cli("inspect", tmp_path / "a.safetensors", "--json").stdout)
    assert info["zero_alpha_modules"] == [names[0]] and info["negative_alpha_modules"] == [names[2], names[4]]


def test_a_merge_with_an_all_zero_module_says_it_was_left_out(tmp_path, cli):
    modules = sdxl_lora(sdxl_specs(per_group=1), rank=4)
    names = list(modules)
    modules[names[0]].alpha = 0.0
    save_lora(modules, tmp_path / "a.safetensors")
    res = cli("merge", tmp_path / "a.safetensors", "--threads", "1", "-o", tmp_path / "m.safetensors")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == (f"wrote {tmp_path / 'm.safetensors'} (2 modules, method rsvd; 1 with a "
                                           "zero result left out)")


def test_missing_file(tmp_path, cli):
    assert_one_line_error(cli("inspect", tmp_path / "nope.safetensors"), "file not found")


def test_empty_file(tmp_path, cli):
    (tmp_path / "e.safetensors").write_bytes(b"")
    assert_one_line_error(cli("inspect", tmp_path / "e.safetensors"), "file is empty")


def test_truncated_file(tmp_path, cli):
    p = tmp_path / "t.safetensors"
    save_lora(sdxl_lora(sdxl_specs(per_group=1), rank=4), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    assert_one_line_error(cli("inspect", p), "truncated")


def test_corrupt_header(tmp_path, cli):
    p = tmp_path / "c.safetensors"
    p.write_bytes((40).to_bytes(8, "little") + b"{not json at all" + b" " * 24 + b"\x00" * 16)
    assert_one_line_error(cli("inspect", p), "corrupt safetensors header")


@pytest.mark.parametrize("down_offsets, data, needle", [
    ([16, 32], 40, "corrupt safetensors file"),  # trailing bytes: safetensors' own parser refuses the file
    ([8, 24], 32, "overlap"),  # two tensors over the same bytes: refused before any read
])
def test_headers_that_lie_about_the_data_are_one_line(tmp_path, cli, down_offsets, data, needle):
    header = json.dumps({"lora_unet_x.lora_up.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                         "lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2, 2],
                                                          "data_offsets": down_offsets}})
    p = tmp_path / "o.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\x00" * data)
    assert_one_line_error(cli("inspect", p), needle)


def test_unknown_key_layout(tmp_path, cli):
    from safetensors.torch import save_file
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "k.safetensors"))
    assert_one_line_error(cli("inspect", tmp_path / "k.safetensors"), "unknown key layout")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_would_run_code_is_refused_and_the_code_did_not_run(tmp_path, cli):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    with open(p, "wb") as fh:
        pickle.dump({"lora_unet_x.lora_up.weight": RunsCode(str(marker))}, fh)
    # torch's own zip format as well
    torch.save({"x": RunsCode(str(marker))}, tmp_path / "evil2.ckpt")
    assert_one_line_error(subprocess_cli("inspect", p), "refusing to load")  # the real command line
    assert_one_line_error(cli("inspect", tmp_path / "evil2.ckpt"), "refusing to load")
    assert not marker.exists()


def test_non_tensor_payload(tmp_path, cli):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert_one_line_error(cli("inspect", tmp_path / "list.pt"), "non-tensor payload")


def test_ctrl_c_is_one_line_even_when_a_native_call_turns_it_into_another_error(tmp_path, cli, monkeypatch):
    """safetensors' reader, interrupted, can raise ValueError instead of KeyboardInterrupt: still exit 130."""
    from merge_core.commands import inspect_cmd

    def interrupted_read(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    monkeypatch.setattr(inspect_cmd, "run", interrupted_read)
    res = cli("inspect", tmp_path / "a.safetensors")
    assert res.returncode == 130 and res.stderr.strip() == "error: interrupted; no output was written"


def test_an_unforeseen_exception_is_one_line_naming_it_a_bug_and_its_traceback_comes_with_v(tmp_path, cli,
                                                                                               monkeypatch):
    from merge_core import __version__
    from merge_core.commands import inspect_cmd

    monkeypatch.setattr(inspect_cmd, "run", lambda args: int("not a number"))
    res = cli("inspect", tmp_path / "a.safetensors")
    assert res.returncode == 1 and res.stderr.splitlines() == [
        "error: internal error (ValueError: invalid literal for int() with base 10: 'not a number'). This is a bug in "
        f"lora-rsvd-merge {__version__}: please report it with the command line; -v prints the traceback"]
    with pytest.raises(ValueError):
        cli("inspect", tmp_path / "a.safetensors", "-v")

    def too_big(args):
        raise MemoryError()

    monkeypatch.setattr(inspect_cmd, "run", too_big)
    res = cli("inspect", tmp_path / "a.safetensors")
    assert res.returncode == 1 and res.stderr.splitlines() == [
        "error: out of memory; free some memory (merge, fuse: fewer --threads hold fewer modules at once)"]
