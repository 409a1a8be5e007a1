"""`python -m merge_core fuse` as a user runs it: one-line errors with a non-zero exit, and a full run with
--verify, --metadata and --report on real files (SDXL names, LoKr + LoHa + LoRA)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from synth import FUSE_NAMES as NAMES
from synth import write_loha, write_lokr

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merge_core", "fuse", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuse_cli")
    return write_lokr(d / "a.safetensors", 1), write_lokr(d / "b.safetensors", 2), write_loha(d / "c.safetensors", 3)


def test_usage_errors_are_one_line(inputs, tmp_path):
    r = cli(*inputs, "--norm-threshold", "nan", "-o", tmp_path / "out.safetensors")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: argument --norm-threshold: not a finite number: 'nan' (see python -m merge_core fuse --help)"]
    r = cli(*inputs, "--device", "", "-o", tmp_path / "out.safetensors")  # an empty shell variable
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: argument --device: an empty device name; use auto, cpu, cuda or cuda:N (see python -m merge_core "
        "fuse --help)"]


def test_verbose_after_the_command_logs_every_module(inputs, tmp_path):
    r = cli(*inputs[:2], "-v", "-o", tmp_path / "out.safetensors")
    assert r.returncode == 0, r.stderr
    logged = sorted(line.split()[-1] for line in r.stderr.splitlines() if line.startswith("fuse "))
    assert logged == sorted(NAMES)


def test_weight_count_mismatch_is_one_line(inputs, tmp_path):
    r = cli(*inputs, "--weights", "0.5", "0.5", "-o", tmp_path / "out.safetensors")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["error: number of weights (2) must match number of models (3)"]
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_file_is_one_line(inputs, tmp_path):
    missing = tmp_path / "nope.safetensors"
    r = cli(inputs[0], missing, "-o", tmp_path / "out.safetensors")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "file not found" in lines[0] and str(missing) in lines[0]


def test_full_run_writes_verifies_and_describes(inputs, tmp_path):
    out, meta, report = tmp_path / "fused.pt", tmp_path / "meta.json", tmp_path / "report.json"
    r = cli(*inputs, "--weights", "0.5", "0.3", "0.2", "--strategy", "weighted_average", "--output-format", "lora",
            "--energy", "1.0", "--max-rank", "128", "--dtype", "float32", "--device", "cpu",
            "--verify", "--metadata", meta, "--report", report, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "verify: 2 modules re-read" in r.stdout
    info = json.loads(meta.read_text())
    assert [i["sha256"] for i in info["recipe"]["inputs"]] == [hashlib.sha256(p.read_bytes()).hexdigest()
                                                             for p in inputs]
    assert info["recipe"]["parameters"]["weights"] == [0.5, 0.3, 0.2]
    assert info["recipe"]["parameters"]["strategy"] == "weighted_average"
    assert {m["name"] for m in info["modules"]} == set(NAMES)
    for m in info["modules"]:
        assert m["kind"] == "lora" and m["verify_rel_error"] < 1e-5 and m["rel_error"] < 1e-5
        assert m["coefficients"] == pytest.approx([0.5, 0.3, 0.2])
    assert json.loads(report.read_text())["operation"] == "fuse"
    again = cli(*inputs, "-o", out)
    assert again.returncode != 0 and "pass --overwrite" in again.stderr


@pytest.mark.parametrize("output_format", ["auto", "lora", "full"])
def test_nan_input_is_named_and_nothing_is_written(inputs, tmp_path, output_format):
    bad = tmp_path / "nan.safetensors"
    name = next(iter(NAMES))
    sd = {k: v.clone() for k, v in load_file(str(inputs[0])).items()}
    sd[f"{name}.lokr_w1"][0, 0] = float("nan")
    save_file(sd, str(bad))
    out = tmp_path / "out.safetensors"
    r = cli(inputs[1], bad, "--output-format", output_format, "-o", out)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: module '{name}' of {bad} holds NaN or infinite values (a damaged "
                                             "file, e.g. an fp16 overflow in training); nothing was written"]
    assert not out.exists()


def test_a_bare_output_name_gets_the_safetensors_suffix(inputs, tmp_path):
    r = cli(*inputs, "-o", tmp_path / "fused")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["fused.safetensors"]


def test_values_beyond_fp16_are_refused_not_written_as_inf(inputs, tmp_path):
    """(the full form: the lokr and lora forms balance their factors, ~‖ΔW‖^½ each)"""
    big = tmp_path / "big.safetensors"
    scale = {"lokr_w1": 1e7}  # ΔW entries ~1e5: finite in fp32, inf in fp16
    sd = {k: v * scale.get(k.rsplit(".", 1)[1], 1.0) for k, v in load_file(str(inputs[0])).items()}
    save_file(sd, str(big))
    out = tmp_path / "out.safetensors"
    r = cli(big, inputs[1], "--output-format", "full", "-o", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "beyond float16's range (±65504); save it as fp32 or bf16; nothing was written" in lines[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["big.safetensors"]
    assert cli(big, inputs[1], "--output-format", "full", "--dtype", "float32", "-o", out).returncode == 0


def test_report_and_metadata_on_one_path_are_refused(inputs, tmp_path):
    side = tmp_path / "side.json"
    r = cli(*inputs, "-o", tmp_path / "out.safetensors", "--report", side, "--metadata", side)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --metadata {side} is the other side file too; give each a file "
                                             "of its own"]
    assert not list(tmp_path.iterdir())
