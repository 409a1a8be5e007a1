"""Synthetic adapters for tests: random factors with known dense deltas, on real SDXL names and shapes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from merge_core.adapters import LoRA
from merge_core.keys.sdxl_table import ModuleSpec, sdxl_modules


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)) * scale


def lora_for(shape: tuple[int, ...], rank: int, alpha: Optional[float] = None, seed: int = 0) -> LoRA:
    """A LoRA/LoCon module for a weight of `shape` (linear or conv kh×kw)."""
    out, inn = shape[0], shape[1]
    if len(shape) == 2:
        return LoRA(randn(out, rank, seed=seed, scale=0.1), randn(rank, inn, seed=seed + 1, scale=0.1), alpha)
    kh, kw = shape[2:]
    return LoRA(randn(out, rank, 1, 1, seed=seed, scale=0.1), randn(rank, inn, kh, kw, seed=seed + 1, scale=0.1), alpha)


def decaying_lora(shape: tuple[int, ...], rank: int, decay: float = 0.8, seed: int = 0) -> LoRA:
    """A LoRA whose ΔW has singular values decay**i (orthonormal factors), α = rank (scale 1)."""
    out, n = shape[0], math.prod(shape[1:])
    qu, _ = torch.linalg.qr(randn(out, rank, seed=seed))
    qv, _ = torch.linalg.qr(randn(n, rank, seed=seed + 1))
    s = decay ** torch.arange(rank, dtype=torch.float32)
    return LoRA.from_factors(qu * s.sqrt(), (qv * s.sqrt()).T, shape)


def sdxl_specs(per_group: Optional[int] = None, locon: bool = False) -> list[ModuleSpec]:
    """SDXL modules (all, or the first `per_group` of unet/te1/te2), LoCon extras if asked."""
    specs = [s for s in sdxl_modules().values() if locon or not s.locon]
    if per_group is None:
        return specs
    out, seen = [], {}
    for s in specs:
        key = (s.group, s.locon)
        if seen.get(key, 0) < per_group:
            seen[key] = seen.get(key, 0) + 1
            out.append(s)
    return out


def sdxl_lora(specs: list[ModuleSpec], rank: int = 4, alpha: Optional[float] = 2.0, seed: int = 0) -> dict[str, LoRA]:
    return {s.name: lora_for(s.shape, rank, alpha, seed=seed + 7 * i) for i, s in enumerate(specs)}


# ---------------------------------------------------------------- LyCORIS files for fuse

FUSE_NAMES = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}


def write_lokr(path: Path, seed: int) -> Path:
    """A LoKr file on FUSE_NAMES: w1 8×8, w2 factorised at rank 4, α 2."""
    sd = {}
    for i, (name, (out, inn)) in enumerate(FUSE_NAMES.items()):
        s = seed + 10 * i
        sd.update({f"{name}.lokr_w1": randn(8, 8, seed=s, scale=0.1),
                   f"{name}.lokr_w2_a": randn(out // 8, 4, seed=s + 1, scale=0.1),
                   f"{name}.lokr_w2_b": randn(4, inn // 8, seed=s + 2, scale=0.1), f"{name}.alpha": torch.tensor(2.0)})
    save_file(sd, str(path))
    return path


def write_loha(path: Path, seed: int) -> Path:
    """A LoHa file on FUSE_NAMES: both Hadamard factors at rank 2, α 1."""
    sd = {}
    for i, (name, (out, inn)) in enumerate(FUSE_NAMES.items()):
        s = seed + 10 * i
        sd.update({f"{name}.hada_w1_a": randn(out, 2, seed=s, scale=0.1),
                   f"{name}.hada_w1_b": randn(2, inn, seed=s + 1, scale=0.1),
                   f"{name}.hada_w2_a": randn(out, 2, seed=s + 2, scale=0.1),
                   f"{name}.hada_w2_b": randn(2, inn, seed=s + 3, scale=0.1), f"{name}.alpha": torch.tensor(1.0)})
    save_file(sd, str(path))
    return path
