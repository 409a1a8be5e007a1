"""Helpers for the merge tests: synthetic SDXL LoRA sets on real module names/shapes, and independent dense
references (fp64, written from the raw tensors here, not from merge_core's own delta/operator code)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_core.adapters import LoRA
from merge_core.cli import main
from merge_core.keys.profiles import Naming
from merge_core.keys.sdxl_table import sdxl_modules
from merge_core.lora_file import LoraSet, load_lora
from merge_core.lowrank import RankRule
from merge_core.merge import merge_loras

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small ops on a 2-core machine shared with other jobs run far faster on one thread (OpenMP barriers
    stall when the cores are busy); restored afterwards.  Import it into a test module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
# small real SDXL modules: two 640x640 UNet attention layers, one 640x2048 cross-attention key, one CLIP-L
# projection, and one LoCon 3x3 conv
NAMES = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
CONV = "lora_unet_input_blocks_1_0_in_layers_2"


def shape_of(name: str) -> tuple[int, ...]:
    return sdxl_modules()[name].shape


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_lora(shape: tuple[int, ...], rank: int, alpha: Optional[float], seed: int) -> LoRA:
    out, inn = shape[0], shape[1]
    kernel = tuple(shape[2:])
    up = torch.randn(out, rank, *([1] * len(kernel)), generator=gen(seed)) * 0.1
    down = torch.randn(rank, inn, *kernel, generator=gen(seed + 1)) * 0.1
    return LoRA(up, down, alpha)


def decaying_lora(shape: tuple[int, ...], rank: int, decay: float, seed: int, alpha: Optional[float] = None) -> LoRA:
    """ΔW with singular values decay**i exactly (α/r compensated in the factors)."""
    out, n = shape[0], math.prod(shape[1:])
    qu, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen(seed), dtype=F64))
    qv, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen(seed + 1), dtype=F64))
    s = decay ** torch.arange(rank, dtype=F64)
    scale = 1.0 if alpha is None else alpha / rank
    up = (qu * (s / scale).sqrt()).float()
    down = ((qv * s.sqrt()).T).float()
    if len(shape) > 2:
        up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, *shape[1:])
    return LoRA(up.contiguous(), down.contiguous(), alpha)


def lora_set(modules: dict, arch: str = "sdxl", source=None) -> LoraSet:
    return LoraSet(dict(modules), Naming("sdxl" if arch == "sdxl" else "kohya", arch, {n: n for n in modules}),
                   source=source)


def dense(m: LoRA) -> torch.Tensor:
    """(α/r)·up@down in fp64, matrix form; no alpha means scale 1."""
    r = m.down.shape[0]
    scale = 1.0 if m.alpha is None else m.alpha / r
    return scale * (m.up.flatten(1).to(F64) @ m.down.flatten(1).to(F64))


def dense_of(path: Path, name: str) -> torch.Tensor:
    """(α/r)·up@down of module `name` of a kohya file, fp64, matrix form, read straight from its tensors."""
    with safe_open(str(path), "pt") as f:
        up, down = f.get_tensor(f"{name}.lora_up.weight"), f.get_tensor(f"{name}.lora_down.weight")
        alpha = float(f.get_tensor(f"{name}.alpha"))
    return alpha / down.shape[0] * (up.flatten(1).to(F64) @ down.flatten(1).to(F64))


def target(sets: Sequence[LoraSet], weights: Sequence[float], name: str) -> torch.Tensor:
    return sum(w * dense(s.modules[name]) for w, s in zip(weights, sets) if name in s.modules)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def optimal_error(T: torch.Tensor, k: int) -> float:
    s2 = torch.linalg.svdvals(T) ** 2
    return math.sqrt(float(s2[k:].sum() / s2.sum()))


def energy_rank(T: torch.Tensor, energy: float = 0.99, lo: int = 4, hi: int = 32) -> int:
    s2 = torch.linalg.svdvals(T) ** 2
    cum = torch.cumsum(s2, 0) / s2.sum()
    k = int(torch.nonzero(cum >= energy)[0]) + 1
    return min(max(k, lo), hi)


def write_kohya(path: Path, rank: int, alpha: float, seed: int, names) -> Path:
    """A kohya LoRA file with random factors (×0.1) of `rank` for each SDXL module name."""
    sd = {}
    for i, n in enumerate(names):
        shape = shape_of(n)
        kernel = tuple(shape[2:])
        sd[f"{n}.lora_up.weight"] = torch.randn(shape[0], rank, *([1] * len(kernel)), generator=gen(seed + i)) * 0.1
        sd[f"{n}.lora_down.weight"] = torch.randn(rank, shape[1], *kernel, generator=gen(seed + 50 + i)) * 0.1
        sd[f"{n}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def cli_inputs(folder: Path) -> tuple[Path, Path]:
    """Two small SDXL kohya files for the CLI tests: rank 8 with a 3x3 LoCon module, and rank 4."""
    return (write_kohya(folder / "a.safetensors", 8, 4.0, 1, NAMES + [CONV]),
            write_kohya(folder / "b.safetensors", 4, 4.0, 2, NAMES))


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    """The same command line through merge_core.cli.main in this process (no interpreter start-up)."""
    code = main(["merge", *map(str, args), "--threads", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dense_result(result) -> dict[str, torch.Tensor]:
    """Each merged module's ΔW in fp64."""
    return {name: m.delta().double() for name, m in result.modules.items()}


def check_sum(result, parts: Sequence[dict], weights: Sequence[float]) -> None:
    """The result holds exactly the modules of `parts` (name -> dense ΔW each), each Σ wᵢ·partᵢ to fp32 round-off."""
    names = set().union(*parts)
    assert set(result.modules) == names
    got = dense_result(result)
    for name in names:
        want = sum(w * p[name] for w, p in zip(weights, parts) if name in p)
        assert torch.allclose(got[name], want, rtol=0, atol=1e-5 * float(want.abs().max())), name


def merged_two_ways(tmp_path: Path, caplog, first, second, full_rank: int):
    """Two LoRAs of one model named two ways (`first`, `second` write a file and return its dense ΔW per module),
    merged by concat (weights 1, -0.5; no warning) and by svd at `full_rank` (0.3, 0.7), both checked against the
    dense sums: (the concat result, the svd result)."""
    parts = [first(tmp_path / "k.safetensors"), second(tmp_path / "d.safetensors")]
    sets = [load_lora(tmp_path / "k.safetensors"), load_lora(tmp_path / "d.safetensors")]
    with caplog.at_level("WARNING"):
        result = merge_loras(sets, "concat", weights=[1.0, -0.5])
    assert caplog.records == []  # modules shared: no "merged with nothing" warning
    check_sum(result, parts, [1.0, -0.5])
    exact = merge_loras(sets, "svd", weights=[0.3, 0.7], rule=RankRule(rank=full_rank))  # T itself
    check_sum(exact, parts, [0.3, 0.7])
    return result, exact
