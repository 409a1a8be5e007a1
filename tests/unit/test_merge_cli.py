"""`python -m merge_core merge` as a user runs it, on small synthetic SDXL files: the written file, the report
JSON, the recipe, refusing to overwrite, and one-line errors with exit status 2."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_core.commands.common import write_report
from merge_core.errors import NonFiniteError, OutputWriteError
from merge_core.lora_file import load_lora, save_lora
from merge_core.merge import merge_loras, parse_block_weights
from merge_testlib import one_torch_thread  # noqa: F401  (autouse)
from merge_testlib import CONV, NAMES, cli_inputs, dense_of, rel, run_in_process
from synth import lora_for

ROOT = Path(__file__).resolve().parents[2]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merge_core", "merge", *map(str, args), "--threads", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return cli_inputs(tmp_path_factory.mktemp("merge_cli"))


def test_rsvd_end_to_end_report_recipe_and_no_overwrite(inputs, tmp_path):
    out, rep = tmp_path / "merged.safetensors", tmp_path / "report.json"
    r = cli(*inputs, "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "merge: 5 modules" in r.stdout
    report = json.loads(rep.read_text())
    assert {"modules", "total_params", "avg_rank", "seconds"} <= set(report)
    assert isinstance(report["total_params"], int) and isinstance(report["avg_rank"], float)
    assert len(report["modules"]) == 5
    assert set(report["modules"][0]) >= {"name", "rank", "params", "rel_error", "energy_kept"}
    assert report["total_params"] == sum(m["params"] for m in report["modules"])
    merged = load_lora(out)
    assert set(merged.modules) == set(NAMES + [CONV])
    for n in NAMES:  # default 1/N weights; ranks 8 + 4 = 12 <= 32 keep >= 99 % of the energy
        m = merged.modules[n]
        assert m.alpha == m.rank and m.up.dtype == torch.float16
        T = 0.5 * dense_of(inputs[0], n) + 0.5 * dense_of(inputs[1], n)
        row = next(x for x in report["modules"] if x["name"] == n)
        assert rel(dense_of(out, n), T) == pytest.approx(row["rel_error"], abs=2e-3)  # fp16 file
    recipe = json.loads(merged.metadata["lora_rsvd_merge.recipe"])
    assert recipe["parameters"]["method"] == "rsvd" and recipe["parameters"]["weights"] == [0.5, 0.5]
    assert [i["sha256"] for i in recipe["inputs"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs]

    before = out.read_bytes()
    again = cli(*inputs, "-o", out)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: output exists, not overwriting (pass --overwrite to replace it): {out}"]
    assert out.read_bytes() == before
    assert cli(*inputs, "-o", out, "--method", "concat", "--overwrite").returncode == 0
    assert load_lora(out).modules[NAMES[0]].rank == 12


def test_concat_with_weights_block_weights_and_fp32(inputs, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    blocks = ",".join(["1"] * 12)  # short form: IN01 (the LoCon conv) -> 0
    code, _, err = run_in_process(capsys, *inputs, "--method", "concat", "--weights", "1", "-0.5", "--block-weights",
                                  blocks, "-", "--dtype", "fp32", "-o", out)
    assert code == 0, err
    merged = load_lora(out)
    assert CONV not in merged.modules and merged.modules[NAMES[0]].up.dtype == torch.float32
    T = dense_of(inputs[0], NAMES[0]) - 0.5 * dense_of(inputs[1], NAMES[0])
    assert rel(dense_of(out, NAMES[0]), T) < 1e-6


def test_fixed_rank(inputs, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert run_in_process(capsys, *inputs, "--rank", "3", "-o", out)[0] == 0
    assert {m.rank for m in load_lora(out).modules.values()} == {3}


def test_one_rank_bound_moves_the_other_default_to_meet_it(inputs, tmp_path, capsys):
    """--max-rank 2 alone: 2..2 (not a refusal of the default 4..2); --min-rank 40 alone: 40..40."""
    for flag, value, ranks in (("--max-rank", "2", {2}), ("--min-rank", "40", {12, 8})):  # 8+4 stacked, conv 8
        out = tmp_path / f"b{value}.safetensors"
        code, _, err = run_in_process(capsys, *inputs, flag, value, "-o", out)
        assert code == 0, err
        assert {m.rank for m in load_lora(out).modules.values()} == ranks


@pytest.mark.parametrize("args,message", [
    (("--weights", "1"), "error: number of weights (1) must match number of inputs (2)"),
    (("--method", "geometric_mean"), f"error: geometric_mean needs equal factor shapes: module '{sorted(NAMES)[0]}' "
                                     "has rank 8 in {a} but rank 4 in {b}"),
    (("--block-weights", "1,2,3"), "error: block weights: SDXL takes 20 values (BASE, IN00-IN08, MID, OUT00-OUT08) "
                                   "or 12 (BASE, IN04, IN05, IN07, IN08, MID, OUT00-OUT05); Flux.1 takes 58 (BASE, "
                                   "D00-D18, S00-S37); got 3 values"),
])
def test_errors_are_one_line_and_write_nothing(inputs, tmp_path, capsys, args, message):
    """(the first module in file order: safetensors keeps keys sorted)"""
    out = tmp_path / "x.safetensors"
    code, _, err = run_in_process(capsys, *inputs, *args, "-o", out)
    assert code == 2
    assert err.strip().splitlines() == [message.format(a=inputs[0], b=inputs[1])]
    assert not out.exists()


@pytest.fixture(scope="module")
def damaged(inputs, tmp_path_factory):
    """b with one NaN and one infinity in the first module (as an fp16 overflow in training leaves them)."""
    with safe_open(str(inputs[1]), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(NAMES)[0]
    up = sd[f"{name}.lora_up.weight"].clone()
    up[0, 0], up[1, 0] = float("nan"), float("inf")
    sd[f"{name}.lora_up.weight"] = up
    path = tmp_path_factory.mktemp("damaged") / "b_nan.safetensors"
    save_file(sd, str(path))
    return path, name


@pytest.mark.parametrize("method", ["rsvd", "svd", "concat", "ties", "dare"])
def test_nan_or_inf_input_is_named_and_nothing_is_written(inputs, damaged, tmp_path, capsys, method):
    path, name = damaged
    out = tmp_path / "x.safetensors"
    code, _, err = run_in_process(capsys, inputs[0], path, "--method", method, "-o", out)
    assert code == 2
    assert err.strip().splitlines() == [f"error: module '{name}' of {path} holds NaN or infinite values (a damaged "
                                        "file, e.g. an fp16 overflow in training); nothing was written"]
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def oversized(inputs, tmp_path_factory):
    """b in fp32 with one up and one down entry of 1e5: a ΔW entry of ~1e10, whose factors stay beyond fp16's
    ±65504 however they are balanced."""
    with safe_open(str(inputs[1]), "pt") as f:
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    name = sorted(NAMES)[0]
    sd[f"{name}.lora_up.weight"][0, 0] = 1e5
    sd[f"{name}.lora_down.weight"][0, 0] = 1e5
    path = tmp_path_factory.mktemp("oversized") / "b_big.safetensors"
    save_file(sd, str(path))
    return path, name


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_values_beyond_fp16_are_refused_not_written_as_inf(inputs, oversized, tmp_path, capsys, suffix):
    path, name = oversized
    out = tmp_path / f"x{suffix}"
    code, _, err = run_in_process(capsys, inputs[0], path, "--method", "concat", "-o", out)
    assert code == 2
    what = f"'{name}.lora_up.weight'" if suffix == ".safetensors" else f"'{name}' (up)"  # streamed | held
    assert re.fullmatch(f"error: {re.escape(what)} holds values up to [0-9]+, beyond float16's range \\(±65504\\); "
                        "save it as fp32 or bf16; nothing was written", err.strip()), err
    assert not list(tmp_path.iterdir())
    code, _, err = run_in_process(capsys, inputs[0], path, "--method", "concat", "--dtype", "bf16", "-o", out)
    assert code == 0, err
    expected = load_lora(inputs[0]).modules[name].delta() + load_lora(path).modules[name].delta()
    got = load_lora(out).modules[name].delta()
    assert torch.isfinite(got).all() and got.abs().max() > 1e9
    assert torch.allclose(got, expected, rtol=2e-2, atol=1e-2 * float(expected.abs().max()))


def test_concat_balances_factors_stored_unevenly(inputs, tmp_path, capsys):
    """An input whose up is ×1e6 and down ÷1e6 (the same ΔW) fits fp16 once concat balances each rank-1 term."""
    with safe_open(str(inputs[1]), "pt") as f:
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    name = sorted(NAMES)[0]
    sd[f"{name}.lora_up.weight"] *= 1e6
    sd[f"{name}.lora_down.weight"] /= 1e6
    uneven = tmp_path / "uneven.safetensors"
    save_file(sd, str(uneven))
    out = tmp_path / "c.safetensors"
    code, _, err = run_in_process(capsys, inputs[0], uneven, "--method", "concat", "-o", out)
    assert code == 0, err
    merged = load_lora(out).modules[name]
    assert merged.up.dtype == torch.float16 and torch.isfinite(merged.up).all()
    expected = load_lora(inputs[0]).modules[name].delta() + load_lora(inputs[1]).modules[name].delta()
    assert torch.allclose(merged.delta(), expected, rtol=0, atol=2e-3 * float(expected.abs().max()))
    ups, downs = merged.up.float().flatten(1).norm(dim=0), merged.down.float().flatten(1).norm(dim=1)
    assert torch.allclose(ups, downs, rtol=2e-3)


def test_non_finite_options_are_refused_by_the_parser(inputs, tmp_path):
    for option, value in ((["--weights", "1", "nan"], "nan"), (["--energy", "inf"], "inf"),
                          (["--density=-inf"], "-inf")):
        r = cli(*inputs, *option, "-o", tmp_path / "x.safetensors")
        assert r.returncode == 2
        flag = option[0].split("=")[0]
        assert r.stderr.strip().splitlines() == [
            f"error: argument {flag}: not a finite number: '{value}' (see python -m merge_core merge --help)"]
    assert not (tmp_path / "x.safetensors").exists()


def test_non_finite_weights_are_refused_by_the_api(inputs):
    sets = [load_lora(p) for p in inputs]
    with pytest.raises(NonFiniteError, match="weights must be finite, value 2 of 2 is inf"):
        merge_loras(sets, weights=[0.5, float("inf")])
    with pytest.raises(NonFiniteError, match="block weights must be finite, value 3 of 12 is nan"):
        parse_block_weights("1,1,nan," + ",".join(["1"] * 9))


def test_trigger_words_and_tags_are_carried_over(inputs, tmp_path, capsys):
    """Both write paths (streamed .safetensors, and merge_loras + save) keep the inputs' tags and trigger words."""
    tagged = []
    for path, tags, phrase in ((inputs[0], {"10_alice": {"alice": 10, "smile": 3}}, "alice"),
                               (inputs[1], {"5_bob": {"bob": 5, "smile": 2}, "10_alice": {"smile": 1}}, "bob")):
        with safe_open(str(path), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        tagged.append(tmp_path / f"tagged_{path.name}")
        save_file(sd, str(tagged[-1]), metadata={"ss_tag_frequency": json.dumps(tags),
                                                 "modelspec.trigger_phrase": phrase, "ss_seed": "42"})
    expected_tags = {"10_alice": {"alice": 10, "smile": 4}, "5_bob": {"bob": 5, "smile": 2}}
    streamed = tmp_path / "streamed.safetensors"
    assert run_in_process(capsys, *tagged, "-o", streamed)[0] == 0
    held = merge_loras([load_lora(p) for p in tagged], "concat").save(tmp_path / "held.safetensors")
    for out in (streamed, held):
        meta = load_lora(out).metadata
        assert json.loads(meta["ss_tag_frequency"]) == expected_tags
        assert meta["modelspec.trigger_phrase"] == "alice, bob"
        assert "ss_seed" not in meta  # training details of one input do not describe the merge
        assert meta["ss_network_module"] == "networks.lora"


def test_an_output_name_without_a_file_suffix_gets_safetensors_appended(inputs, tmp_path):
    r = cli(*inputs, "-o", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]
    r = cli(*inputs, "-o", tmp_path / "merged")  # and that file is not replaced without --overwrite
    assert r.returncode == 2 and "output exists" in r.stderr
    r = cli(*inputs, "-o", tmp_path / "style_v1.5")  # a version number is not a file format
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'style_v1.5.safetensors'}" in r.stdout
    assert load_lora(tmp_path / "style_v1.5.safetensors").modules
    r = cli(*inputs, "-o", "")
    assert r.returncode == 2 and "argument -o/--output: an empty path" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors", "style_v1.5.safetensors"]


def test_options_an_exact_method_does_not_use_are_named_and_ignored(inputs, tmp_path):
    r = cli(*inputs, "--method", "concat", "--rank", "4", "--solver", "dense", "-o", tmp_path / "c.safetensors")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "warning: rank options do not apply to concat (its rank follows from the inputs); ignored",
        "warning: --solver does not apply to concat (exact, no SVD); ignored"]


def test_report_path_that_would_lose_a_file_is_refused_before_any_work(inputs, tmp_path):
    """--report onto an input or the output is refused even with --overwrite; onto an existing file without it."""
    a = tmp_path / "a.safetensors"
    a.write_bytes(inputs[0].read_bytes())
    before = a.read_bytes()
    r = cli(a, inputs[1], "-o", tmp_path / "m.safetensors", "--report", a, "--overwrite")
    assert r.returncode == 2 and "--report" in r.stderr and "is the output or an input" in r.stderr
    r = cli(*inputs, "-o", tmp_path / "m.safetensors", "--report", tmp_path / "m.safetensors")
    assert r.returncode == 2 and "is the output or an input" in r.stderr
    r = cli(*inputs, "-o", tmp_path / "m", "--report", tmp_path / "m.safetensors")  # a bare -o gains the suffix
    assert r.returncode == 2 and "is the output or an input" in r.stderr
    r = cli(tmp_path / "missing.safetensors", inputs[1], "-o", tmp_path / "m.safetensors", "--report", a)
    assert r.returncode == 2 and "output exists" in r.stderr  # refused before any input is read (not "not found")
    (tmp_path / "old.json").write_text("keep")
    r = cli(*inputs, "-o", tmp_path / "m.safetensors", "--report", tmp_path / "old.json")
    assert r.returncode == 2 and "output exists" in r.stderr
    assert a.read_bytes() == before and (tmp_path / "old.json").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "old.json"]  # no merge was written
    r = cli(*inputs, "-o", tmp_path / "m.safetensors", "--report", tmp_path / "old.json", "--overwrite")
    assert r.returncode == 0 and json.loads((tmp_path / "old.json").read_text())["modules"]


def test_report_inside_a_peft_adapter_folder_or_naming_a_folder_is_refused(tmp_path, capsys):
    """(a PEFT input or output is a folder: a report onto its adapter_model.safetensors would replace weights)"""
    mods = {f"base_model.model.layers.{i}.self_attn.q_proj": lora_for((16, 12), 2, 2.0, seed=i) for i in range(2)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    a, b = (save_lora(mods, tmp_path / n, arch="other", profile="peft", dtype="fp32", peft_config=config)
            for n in ("pa", "pb"))
    weights = (a / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adir").mkdir()
    for report, why in ((a / "adapter_model.safetensors", "is the output or an input, or inside one"),
                        (tmp_path / "out" / "adapter_config.json", "is the output or an input, or inside one"),
                        (tmp_path / "adir", "is a folder; give it a file name")):
        code, _, err = run_in_process(capsys, a, b, "-o", tmp_path / "out", "--report", report, "--overwrite")
        assert code == 2 and err.strip().splitlines() == [f"error: --report {report} {why}" +
                                                          ("; give it a file of its own" if "inside" in why else "")]
    assert (a / "adapter_model.safetensors").read_bytes() == weights and not (tmp_path / "out").exists()


def test_a_report_that_cannot_be_written_says_the_output_stands(tmp_path):
    """(write_report runs after the output is written; check_side_files refuses this path up front in the CLI)"""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputWriteError, match=r"^cannot write .*afile/r\.json: a folder on its path is a file\. The "
                                               r"output was written; only this file is missing\.$"):
        write_report(str(tmp_path / "afile" / "r.json"), {"modules": []}, overwrite=False)


def test_writing_over_an_input_is_refused_up_front_on_windows_only(tmp_path, capsys, monkeypatch):
    """Windows cannot replace a file that is open, and the inputs stay open (memory-mapped) until the output is
    in place: there, `-o` naming an input fails before any work, leaving it as it was; elsewhere it works."""
    import merge_core.files.atomic as atomic

    a, b = cli_inputs(tmp_path)
    before = a.read_bytes()
    monkeypatch.setattr(atomic, "OPEN_FILES_LOCKED", True)
    code, out, err = run_in_process(capsys, a, b, "-o", a, "--overwrite")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: cannot write {a}: it is an input, which stays open while the output is written, and Windows cannot "
        "replace an open file; write to a new name. Nothing was changed."]
    assert a.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    code, _, _ = run_in_process(capsys, a, b, "-o", tmp_path / "new.safetensors", "--overwrite")
    assert code == 0
    monkeypatch.setattr(atomic, "OPEN_FILES_LOCKED", False)
    code, _, _ = run_in_process(capsys, a, b, "-o", a, "--overwrite")
    assert code == 0 and a.read_bytes() != before
