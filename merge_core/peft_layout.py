"""PEFT's adapter layout, read and written: adapter_model.safetensors + adapter_config.json.

Reading: α from the config (alpha_pattern wins; rsLoRA's α/√r folded in), a LoRA on an nn.Embedding
(lora_embedding_A r×vocab, lora_embedding_B dim×r, ΔW = (B·A)ᵀ·α/r) held like any LoRA, and lora_bias's
lora_B.bias b as the bias delta (α/r)·b.  Writing: each module's α/r folded into lora_B so the config says
scale 1 (lora_alpha = r, rank_pattern/alpha_pattern for the modules whose rank differs), and back the same
way for embeddings and biases.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from .adapters import AdapterModule, LoRA
from .errors import FormatError
from .files.atomic import atomic_folder
from .files.narrow import narrowed
from .files.stream_writer import Entry
from .keys.suffixes import PEFT_EMBEDDING_A, PEFT_EMBEDDING_B

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


def config_path(module: str) -> str:
    """The module's name as adapter_config.json patterns see it (without PEFT's base_model.model. prefix)."""
    return module[len(PREFIX):] if module.startswith(PREFIX) else module


def checked_config(config: object, where: Path) -> dict:
    """adapter_config.json as read, its fields merge_core uses checked (r, lora_alpha, the patterns): a
    FormatError naming the field, not a failure later."""
    def bad(field: str, why: str) -> FormatError:
        return FormatError(f"{CONFIG} in {where}: {field + ' ' if field else ''}{why}")

    def number(field: str, value: object, whole: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(field, f"must be a number, got {value!r}")
        if whole and (value != int(value) or value < 1):
            raise bad(field, f"must be a whole number >= 1, got {value!r}")

    if not isinstance(config, dict):
        raise bad("", f"must be a JSON object, got {type(config).__name__}")
    for field, whole in (("r", True), ("lora_alpha", False)):
        if config.get(field) is not None:
            number(field, config[field], whole)
    for field, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise bad(field, f"must be an object of pattern: number, got {patterns!r}")
        for pattern, value in patterns.items():
            number(f"{field}[{pattern!r}]", value, whole)
            try:
                re.compile(pattern)
            except re.error as exc:
                raise bad(f"{field} pattern {pattern!r}", f"is not a regular expression ({exc})") from None
    return config


def module_alpha(module: str, config: dict) -> Optional[float]:
    """lora_alpha for a module (alpha_pattern wins over lora_alpha)."""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", config_path(module)):
            alpha = value
            break
    return None if alpha is None else float(alpha)


def read_conventions(prefix: str, module: AdapterModule, bias: Optional[torch.Tensor], embedding: bool,
                     config: Optional[dict]) -> AdapterModule:
    """PEFT's conventions on a module read by roles: an embedding's B·A is ΔWᵀ (held as up = Aᵀ, down = Bᵀ, like
    any LoRA); α from the config (rsLoRA folded in); lora_B's bias b is the bias delta (α/r)·b."""
    if not isinstance(module, LoRA):
        if bias is not None:
            raise FormatError(f"module '{prefix}' has a lora_B.bias but no LoRA factors")
        return module
    if embedding:
        module.up, module.down = module.down.T, module.up.T
    if module.alpha is None and config is not None:
        module.alpha = module_alpha(prefix, config)
        if module.alpha is not None and config.get("use_rslora"):
            module.alpha *= module.rank ** 0.5
    if bias is not None:
        if module.diff_b is not None:
            raise FormatError(f"module '{prefix}' has both a lora_B.bias and a diff_b")
        module.diff_b = bias.float() * module.scale
    return module


def ranks_of(modules: dict[str, AdapterModule]) -> dict[str, int]:
    """Each module's rank by its config path; only plain LoRA modules have a PEFT form."""
    ranks = {}
    for name, m in modules.items():
        if not isinstance(m, LoRA) or m.mid is not None:
            raise FormatError(f"the PEFT layout holds only plain LoRA modules; '{name}' is {m.kind}")
        ranks[config_path(name)] = m.rank
    return ranks


def module_tensors(name: str, m: LoRA, dtype: torch.dtype, embeddings: frozenset[str],
                   biases: bool) -> dict[str, torch.Tensor]:
    """One module's file tensors, α/r folded into lora_B; an embedding's transposed back, ΔW = (B·A)ᵀ:
    lora_embedding_B = downᵀ, lora_embedding_A = (up·α/r)ᵀ.  `biases` (lora_bias): lora_B.bias = the bias
    delta, zeros for a module without one."""
    up_key, down_key = ((name + PEFT_EMBEDDING_A, name + PEFT_EMBEDDING_B) if name in embeddings
                        else (f"{name}.lora_B.weight", f"{name}.lora_A.weight"))
    up, down = narrowed(m.up.float() * m.scale, dtype, f"'{up_key}'"), narrowed(m.down, dtype, f"'{down_key}'")
    if name in embeddings:
        return {down_key: down.T.contiguous(), up_key: up.T.contiguous()}
    out = {up_key: up.contiguous(), down_key: down.contiguous()}
    if biases:
        bias = m.diff_b if m.diff_b is not None else torch.zeros(m.up.shape[0])
        out[f"{name}.lora_B.bias"] = narrowed(bias, dtype, f"'{name}.lora_B.bias'")
    return out


def module_entries(name: str, up: tuple[int, ...], down: tuple[int, ...], dtype: torch.dtype, embedding: bool,
                   biases: bool) -> list[Entry]:
    """(key, dtype, shape) of the tensors module_tensors writes for factors of these shapes."""
    if embedding:
        return [(name + PEFT_EMBEDDING_B, dtype, down[::-1]), (name + PEFT_EMBEDDING_A, dtype, up[::-1])]
    out = [(f"{name}.lora_B.weight", dtype, up), (f"{name}.lora_A.weight", dtype, down)]
    if biases:
        out.append((f"{name}.lora_B.bias", dtype, up[:1]))
    return out


def entries(modules: dict[str, AdapterModule], dtype: torch.dtype, embeddings: frozenset[str],
            biases: bool) -> list[Entry]:
    """(key, dtype, shape) of every tensor module_tensors writes, without making them."""
    return [e for name, m in modules.items()
            for e in module_entries(name, tuple(m.up.shape), tuple(m.down.shape), dtype, name in embeddings, biases)]


def config_for(ranks: dict[str, int], base: Optional[dict], biases: bool) -> dict:
    """The config to write: the inputs' (base) with r, α = r, the rank/alpha patterns, no rsLoRA, no DoRA (its
    magnitudes are never written), and lora_bias when lora_B carries bias deltas (PEFT ≥ 0.14)."""
    r = max(ranks.values()) if ranks else 1
    config = {k: v for k, v in (base or {}).items() if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}
    config.setdefault("peft_type", "LORA")
    if config.get("use_dora"):
        config["use_dora"] = False
    if biases or config.get("lora_bias"):
        config["lora_bias"] = biases
    config.update(r=r, lora_alpha=r, use_rslora=False,
                  rank_pattern={re.escape(k): v for k, v in ranks.items() if v != r},
                  alpha_pattern={re.escape(k): v for k, v in ranks.items() if v != r})
    if not config.get("target_modules"):
        config["target_modules"] = sorted({k.rsplit(".", 1)[-1] for k in ranks})
    return config


def write_folder(path: Path, write_weights: Callable[[Path], None], config_of: Callable[[], dict],
                 overwrite: bool) -> Path:
    """A PEFT folder, built in a temp folder beside the target and moved into place (files.atomic_folder); the
    config is made once the weights are written (a merge learns the ranks as it writes)."""
    def write(tmp: Path) -> None:
        write_weights(tmp / WEIGHTS[0])
        (tmp / CONFIG).write_text(json.dumps(config_of(), indent=2, sort_keys=True))

    return atomic_folder(path, write, overwrite)
