"""The CUDA path computes what the CPU path computes: every command run with `--device cuda` and with
`--device cpu` on the same files writes the same keys, shapes (ranks) and ΔW, to fp32 round-off.

Skipped without a CUDA GPU (CI has none); run where one is lent. The sketches and DARE masks are drawn on the
CPU from the seed, so both devices factor the same matrices and choose the same ranks."""
from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from extract_bake_fixtures import sdxl_pair
from merge_core.cli import main
from merge_core.device import resolve_device
from merge_core.errors import MergeCoreError
from merge_core.lora_file import load_lora
from merge_core.merge import METHODS
from merge_core.merge.scheduler import CUDA_WORKERS, run_work, torch_threads
from merge_testlib import CONV, NAMES, cli_inputs, rel, write_kohya
from synth import write_loha, write_lokr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ("cpu", "cuda")
TOL = 1e-4  # fp32 on two BLAS libraries; a different rank or a wrong factor is off by far more


@pytest.fixture(scope="module")
def kohya(tmp_path_factory):
    """Rank 8 with a 3×3 LoCon module, rank 4, and rank 8 again (geometric_mean needs equal shapes)."""
    folder = tmp_path_factory.mktemp("cuda_kohya")
    return (*cli_inputs(folder), write_kohya(folder / "c.safetensors", 8, 4.0, 7, NAMES + [CONV]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda_ckpt")
    base, tuned = sdxl_pair(seed=3)
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base.safetensors", folder / "tuned.safetensors"


def run_on_both(tmp_path: Path, *args: str) -> dict[str, Path]:
    """The same command line once per device; returns each device's output file."""
    outputs = {}
    for device in DEVICES:
        out = tmp_path / f"{device}.safetensors"
        assert main([*map(str, args), "--device", device, "-o", str(out)]) == 0
        outputs[device] = out
    return outputs


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def assert_same_adapters(outputs: dict[str, Path]) -> None:
    cpu, cuda = outputs["cpu"], outputs["cuda"]
    assert shapes(cpu) == shapes(cuda)
    on_cpu, on_cuda = load_lora(cpu).modules, load_lora(cuda).modules
    for name, module in on_cpu.items():
        assert rel(on_cuda[name].delta().double(), module.delta().double()) < TOL, name


@pytest.mark.parametrize("method", METHODS)
def test_merge(method, kohya, tmp_path):
    a, b, c = kohya
    outputs = run_on_both(tmp_path, "merge", a, c if method == "geometric_mean" else b, "--method", method, "--dtype", "fp32",
                          *(("--density", "0.5") if method in ("ties", "dare", "dare_ties") else ()))
    assert_same_adapters(outputs)


def test_merge_with_a_size_budget(kohya, tmp_path):
    a, b, _ = kohya
    reports = {}
    for device in DEVICES:
        report = tmp_path / f"{device}.json"
        assert main(["merge", str(a), str(b), "--target-size", "300KB", "--dtype", "fp32", "--device", device,
                     "--report", str(report), "-o", str(tmp_path / f"{device}.safetensors")]) == 0
        reports[device] = json.loads(report.read_text())
    assert [m["rank"] for m in reports["cpu"]["modules"]] == [m["rank"] for m in reports["cuda"]["modules"]]
    assert_same_adapters({d: tmp_path / f"{d}.safetensors" for d in DEVICES})


@pytest.mark.parametrize("form", ["lokr", "lora", "full"])
def test_fuse(form, tmp_path):
    lokr, loha = write_lokr(tmp_path / "lokr.safetensors", 1), write_loha(tmp_path / "loha.safetensors", 2)
    outputs = run_on_both(tmp_path, "fuse", lokr, loha, "--output-format", form, "--dtype", "fp32")
    assert_same_adapters(outputs)


def test_extract(checkpoints, tmp_path):
    base, tuned = checkpoints
    outputs = run_on_both(tmp_path, "extract", "--source-model", base, "--target-model", tuned, "--energy", "0.95",
                          "--output-dtype", "fp32")
    assert_same_adapters(outputs)


def test_bake(checkpoints, tmp_path):
    base, tuned = map(str, checkpoints)
    lora = tmp_path / "lora.safetensors"
    assert main(["extract", "--source-model", base, "--target-model", tuned, "--rank", "8",
                 "--output-dtype", "fp32", "--device", "cpu", "-o", str(lora)]) == 0
    outputs = run_on_both(tmp_path, "bake", "--source-model", base, "--lora-model", lora, "--output-dtype", "fp32")
    on_cpu, on_cuda = load_file(str(outputs["cpu"])), load_file(str(outputs["cuda"]))
    assert on_cpu.keys() == on_cuda.keys()
    for key, weight in on_cpu.items():
        assert rel(on_cuda[key].double(), weight.double()) < 1e-6, key


def test_a_gpu_index_past_the_last_is_one_line():
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(MergeCoreError, match=rf"^device 'cuda:{count}' requested but this machine has {count} "):
        resolve_device(f"cuda:{count}")


def test_gpu_workers_each_queue_on_a_stream_of_their_own():
    streams, threads = set(), set()

    def run(batch: int, device: torch.device) -> float:
        streams.add(torch.cuda.current_stream(device).cuda_stream)
        threads.add(threading.get_ident())
        return (torch.full((256, 256), float(batch), device=device) @ torch.eye(256, device=device)).sum().item()

    recorded = {}
    with torch_threads(CUDA_WORKERS):
        run_work(deque(range(32)), run, recorded.__setitem__, torch.device("cuda"))
    assert recorded == {b: 256.0 * 256 * b for b in range(32)}
    assert len(threads) > 1 and len(streams) == len(threads)
    assert torch.cuda.default_stream().cuda_stream not in streams
