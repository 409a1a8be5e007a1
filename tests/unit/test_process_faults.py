"""Faults injected into a real CLI process while the merge writes its output: Ctrl-C (SIGINT) or a kill's
SIGTERM — exit 128 + the signal with one `error: interrupted` line — and a disk that fills — exit 2 with one
line.  Either way no temp file is left and an output it was replacing stays as it was.  The interrupted merge
is slow on purpose (the kohya-style dense SVD of every module), so the signal lands mid-write, after the temp
file appears."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merge_core.errors import INTERRUPTED
from merge_core.lora_file import save_lora
from synth import sdxl_lora, sdxl_specs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and resource limits")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupts")
    specs = sdxl_specs(per_group=40)
    paths = [folder / "a.safetensors", folder / "b.safetensors"]
    for seed, path in enumerate(paths):
        save_lora(sdxl_lora(specs, rank=4, seed=seed), path)
    return paths


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_write_leaves_no_temp_file_and_the_old_output(inputs, tmp_path, sig):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"the output of an earlier run")
    proc = subprocess.Popen([sys.executable, "-m", "merge_core", "merge", *map(str, inputs), "--method", "svd",
                             "--solver", "dense", "--rank", "4", "-o", str(out), "--overwrite", "--threads", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not temp_files(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the merge ended before it could be interrupted"
    assert temp_files(tmp_path), "no temp file appeared"
    time.sleep(0.3)  # some modules written
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert err.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in err
    assert temp_files(tmp_path) == []
    assert out.read_bytes() == b"the output of an earlier run"


def check_full_disk(argv: list[str], out: Path, limit: int) -> None:
    """`python -m merge_core ARGV -o OUT --overwrite` under a file-size limit of `limit` bytes (RLIMIT_FSIZE: the
    output's writes fail part-way with EFBIG, as a full disk's ENOSPC would) over an existing OUT: exit 2, one
    line, no temp file beside OUT, OUT as it was."""
    import resource

    out.write_bytes(b"the output of an earlier run")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "merge_core", *argv, "-o", str(out), "--overwrite"], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=small_files, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: cannot write {out}: File too large. Nothing was changed."]
    assert temp_files(out.parent) == []
    assert out.read_bytes() == b"the output of an earlier run"


def test_a_disk_that_fills_mid_write_is_one_line_and_keeps_the_old_output(inputs, tmp_path):
    """The merged file is several MiB; the disk fills at 1 MiB."""
    check_full_disk(["merge", *map(str, inputs), "--method", "concat", "--threads", "1"],
                    tmp_path / "merged.safetensors", 1 << 20)


@pytest.mark.parametrize("command", ["extract", "bake"])
def test_extract_and_bake_on_a_disk_that_fills_are_one_line_too(tmp_path, command):
    """The checkpoint paths write differently (extract streams a LoRA, bake a checkpoint whose header is written
    last): the same one line, no temp file, the old output kept.  The disk fills at 256 KiB (the LoRA is over
    1 MiB, the checkpoint 50)."""
    from safetensors.torch import save_file

    from extract_bake_fixtures import sdxl_pair

    base, tuned = sdxl_pair(low_rank=16)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    if command == "bake":
        from merge_core.cli import main

        assert main(["extract", "--source-model", str(tmp_path / "base.safetensors"), "--target-model",
                     str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "lora.safetensors")]) == 0
        argv = ["bake", "--source-model", str(tmp_path / "base.safetensors"), "--lora-model",
                str(tmp_path / "lora.safetensors")]
    else:
        argv = ["extract", "--source-model", str(tmp_path / "base.safetensors"), "--target-model",
                str(tmp_path / "tuned.safetensors"), "--output-dtype", "fp32", "--rank", "16"]
    check_full_disk(argv, tmp_path / "out.safetensors", 1 << 18)
