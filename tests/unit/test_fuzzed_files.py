"""Damaged input files, made by seeded mutations of a good file (header bytes, header fragments, valid headers
that lie about a tensor's dtype, shape or offsets, the length field, tensor bytes, truncation): LoRAs given to
inspect, merge and fuse, and checkpoints given to extract and bake.  Every command either succeeds or fails
with exit code 2 and exactly one line `error: …` — no traceback, no internal-error line — and a failed command
leaves no output and no temp file behind."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from safetensors.torch import save_file

from extract_bake_fixtures import sdxl_pair
from merge_core.cli import main
from merge_core.lora_file import save_lora
from synth import sdxl_lora, sdxl_specs

CASES = 100
CHECKPOINT_CASES = 28
MODES = ("header_byte", "header_chunk", "header_value", "header_value", "length_field", "tensor_bytes", "truncate")
DTYPES = ("F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X9")


def mutate(good: bytes, rng: random.Random, mode: str) -> bytes:
    b = bytearray(good)
    header = int.from_bytes(good[:8], "little")
    if mode == "header_byte":
        for _ in range(rng.randint(1, 4)):
            b[8 + rng.randrange(header)] = rng.randrange(256)
    elif mode == "header_chunk":  # JSON-ish fragments: mangled numbers, brackets, quotes
        at = 8 + rng.randrange(header - 20)
        b[at:at + rng.randint(1, 20)] = bytes(rng.choice(b'{}[]":,0123456789-eE.F') for _ in range(rng.randint(0, 20)))
    elif mode == "header_value":  # valid JSON that lies: a tensor's dtype, one shape entry or one offset changed
        entries = json.loads(good[8:8 + header])
        key = rng.choice([k for k in entries if k != "__metadata__"])
        what = rng.choice(("dtype", "shape", "data_offsets"))
        if what == "dtype":
            entries[key]["dtype"] = rng.choice(DTYPES)
        else:
            values = entries[key][what]
            if values:
                values[rng.randrange(len(values))] += rng.choice((-4096, -2, -1, 1, 2, 4096, 2 ** 40))
            else:  # a scalar (alpha) given a shape
                values.append(rng.choice((0, 1, 2)))
        text = json.dumps(entries).encode()
        b = bytearray(len(text).to_bytes(8, "little") + text + good[8 + header:])
    elif mode == "length_field":
        b[:8] = rng.randrange(2 ** 40).to_bytes(8, "little")
    elif mode == "tensor_bytes":  # fp16 bit flips: NaN/inf or huge values among them
        for _ in range(50):
            b[8 + header + rng.randrange(len(b) - 8 - header)] = rng.randrange(256)
    else:
        b = b[:rng.randrange(len(b))]
    return bytes(b)


def run_each(commands: dict, capsys, mode: str, out_dir: Path) -> None:
    """Run each {name: (argv, its output or None)}: exit 0, or 2 with one `error: …` line; the output exists
    exactly when the command succeeded, and nothing else is left in out_dir (no temp file)."""
    for name, (argv, output) in commands.items():
        code = main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code in (0, 2), (mode, name, code, err)
        if code:
            assert len(err) == 1 and err[0].startswith("error: ") and "internal error" not in err[0], (mode, name, err)
        if output is not None:
            assert output.exists() == (code == 0), (mode, name)
    outputs = {out.name for _, out in commands.values() if out is not None}
    assert {p.name for p in out_dir.iterdir()} <= outputs, mode


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[bytes, Path]:
    folder = tmp_path_factory.mktemp("fuzz")
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    save_lora(sdxl_lora(sdxl_specs(per_group=2, locon=True), rank=4, seed=1), a)
    save_lora(sdxl_lora(sdxl_specs(per_group=2, locon=True), rank=4, seed=2), b)
    return a.read_bytes(), b


@pytest.mark.parametrize("seed", range(CASES))
def test_a_damaged_file_is_one_line_or_a_result(good, tmp_path, capsys, seed):
    rng = random.Random(seed)
    mode = MODES[seed % len(MODES)]
    bad = tmp_path / "in" / "damaged.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(mutate(good[0], rng, mode))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    merged, fused = out_dir / "merged.safetensors", out_dir / "fused.safetensors"
    commands = {
        "inspect": (["inspect", str(bad)], None),
        "merge": (["merge", str(bad), str(good[1]), "--threads", "1", "-o", str(merged)], merged),
        "fuse": (["fuse", str(bad), str(good[1]), "--output-format", "full", "-o", str(fused)], fused),
    }
    run_each(commands, capsys, mode, out_dir)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[bytes, Path, Path]:
    """(the tuned checkpoint's bytes, the base checkpoint, a LoRA extracted from the two)."""
    folder = tmp_path_factory.mktemp("fuzz_ckpt")
    base, tuned = sdxl_pair(seed=0, low_rank=4)
    save_file({k: v.half() for k, v in base.items()}, str(folder / "base.safetensors"))
    save_file({k: v.half() for k, v in tuned.items()}, str(folder / "tuned.safetensors"))
    lora = folder / "lora.safetensors"
    assert main(["extract", "--source-model", str(folder / "base.safetensors"), "--target-model",
                 str(folder / "tuned.safetensors"), "--rank", "4", "-o", str(lora)]) == 0
    return (folder / "tuned.safetensors").read_bytes(), folder / "base.safetensors", lora


@pytest.mark.parametrize("seed", range(CHECKPOINT_CASES))
def test_a_damaged_checkpoint_is_one_line_or_a_result(checkpoints, tmp_path, capsys, seed):
    """The damaged file as extract's tuned model and as bake's base."""
    good, base, lora = checkpoints
    rng = random.Random(1000 + seed)
    mode = MODES[seed % len(MODES)]
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(mutate(good, rng, mode))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    extracted, baked = out_dir / "extracted.safetensors", out_dir / "baked.safetensors"
    commands = {
        "extract": (["extract", "--source-model", str(base), "--target-model", str(bad), "--rank", "4", "-o",
                     str(extracted)], extracted),
        "bake": (["bake", "--source-model", str(bad), "--lora-model", str(lora), "-o", str(baked)], baked),
    }
    run_each(commands, capsys, mode, out_dir)
