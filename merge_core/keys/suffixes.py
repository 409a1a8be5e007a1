"""Split tensor keys into (module prefix, role) for every suffix style the loaders in the wild write.

Roles are the kohya/LyCORIS names (see merge_core.adapters).  LoRA up/down come in many spellings:
kohya `.lora_up.weight`, diffusers `_lora.up.weight` / `.lora.up.weight` / `.lora_linear_layer.up.weight`,
PEFT `.lora_B.weight` (B = up, A = down), and a few more; all map to `lora_up.weight` / `lora_down.weight`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import FormatError

UP, DOWN, MID, ALPHA = "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha"
PEFT_EMBEDDING_A, PEFT_EMBEDDING_B = ".lora_embedding_A", ".lora_embedding_B"
PEFT_BIAS = "lora_B.bias"  # PEFT's lora_bias=True: lora_B's bias b, a bias delta of (α/r)·b (the loader converts)

LORA_SPELLINGS: tuple[tuple[str, str], ...] = (
    (".lora_up.weight", UP), (".lora_down.weight", DOWN), (".lora_mid.weight", MID),
    ("_lora.up.weight", UP), ("_lora.down.weight", DOWN),
    (".lora.up.weight", UP), (".lora.down.weight", DOWN),
    (".lora_linear_layer.up.weight", UP), (".lora_linear_layer.down.weight", DOWN),
    (".lora_B.default.weight", UP), (".lora_A.default.weight", DOWN),
    (".lora_B.weight", UP), (".lora_A.weight", DOWN),
    (".lora_B", UP), (".lora_A", DOWN),
    # PEFT's LoRA on an nn.Embedding: B (dim × r) and A (r × vocab), ΔW = (B·A)ᵀ·α/r — the loader transposes
    (PEFT_EMBEDDING_B, UP), (PEFT_EMBEDDING_A, DOWN),
    (".lora_B.bias", PEFT_BIAS), (".lora_B.default.bias", PEFT_BIAS),
)
LYCORIS_ROLES = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "dora_scale", ALPHA,
)
# LyCORIS norm-layer diffs are plain diffs to ComfyUI; PEFT's DoRA magnitude (saved `.lora_magnitude_vector`, in a
# live model's state dict `.lora_magnitude_vector.default.weight`) is what kohya/LyCORIS call dora_scale
ALIASED_ROLES = ((".w_norm", "diff"), (".b_norm", "diff_b"), (".lora_magnitude_vector", "dora_scale"),
                 (".lora_magnitude_vector.default.weight", "dora_scale"))


@dataclass(frozen=True)
class Suffixes:
    """How LoRA up/down/alpha tensors are named after the module prefix (the original scripts' API)."""

    up: str = ".lora_up.weight"
    down: str = ".lora_down.weight"
    alpha: Optional[str] = ".alpha"


KOHYA = Suffixes()
PEFT = Suffixes(".lora_B.weight", ".lora_A.weight", None)


def suffix_table(custom: Optional[Suffixes] = None) -> list[tuple[str, str]]:
    """(suffix, role) pairs, longest first so `.lora_B.weight` wins over `.lora_B`; custom ones first of all."""
    pairs = list(LORA_SPELLINGS) + [("." + r, r) for r in LYCORIS_ROLES] + list(ALIASED_ROLES)
    pairs.sort(key=lambda p: -len(p[0]))
    if custom is not None:
        extra = [(custom.up, UP), (custom.down, DOWN)] + ([(custom.alpha, ALPHA)] if custom.alpha else [])
        pairs = extra + pairs
    return pairs


def split_key(key: str, table: list[tuple[str, str]]) -> Optional[tuple[str, str]]:
    for suffix, role in table:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def group_keys(keys: Iterable[str], custom: Optional[Suffixes] = None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{prefix: {role: tensor key}} and the keys no known suffix explains; a FormatError when two keys give one
    module the same role (e.g. kohya's lora_up and PEFT's lora_B side by side)."""
    table = suffix_table(custom)
    groups: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        hit = split_key(key, table)
        if hit is None:
            unknown.append(key)
            continue
        roles = groups.setdefault(hit[0], {})
        if hit[1] in roles:
            raise FormatError(f"module '{hit[0]}' has two tensors for its {hit[1]}: '{roles[hit[1]]}' and '{key}'")
        roles[hit[1]] = key
    return groups, unknown


def style_of(keys: Iterable[str]) -> str:
    """'peft' when LoRA tensors use lora_A/lora_B, else 'kohya'."""
    for key in keys:
        if key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight")):
            return "peft"
    return "kohya"
